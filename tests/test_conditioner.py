"""GeneralConditioner and embedders: output grouping, ucg dropout, uc, gradients, text flow."""

from __future__ import annotations

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.nn import conditioner as cond
from sgm_jax.nn.conditioner import (
    ConcatTimestepEmbedderND,
    build_conditioner,
    get_unconditional_conditioning,
    tokenize_batch,
    token_key,
    trainable_mask,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
SEED_PREFIX = "sgm.modules.encoders.modules."


def _spec(target, key, trainable=False, ucg=0.0, **params):
    return {"target": SEED_PREFIX + target, "input_key": key, "is_trainable": trainable,
            "ucg_rate": ucg, "params": params}


@cond.register_embedder
class _TwoOutputs(nn.Module):
    """Test embedder returning a tuple, like CLIP with always_return_pooled."""

    dim: int = 4

    @nn.compact
    def __call__(self, x):
        v = nn.Dense(self.dim)(x)
        return v[:, None, :] + 0.0, v


def _batch(b=4):
    return {
        "cls": jnp.arange(b) % 10,
        "sz": jnp.stack([jnp.full((b,), 64.0), jnp.arange(b, dtype=jnp.float32)], -1),
        "seq": jnp.ones((b, 1, 2)),
        "img": jnp.linspace(-1, 1, b * 8 * 8 * 3).reshape(b, 8, 8, 3),
        "lowres": jnp.ones((b, 4, 4, 3)),
    }


MIXED = [
    _spec("ClassEmbedder", "cls", trainable=True, embed_dim=8, n_classes=10),
    _spec("ConcatTimestepEmbedderND", "sz", outdim=6),
    _spec("IdentityEncoder", "seq"),
    _spec("ClassEmbedder", "cls", embed_dim=5, n_classes=10, add_sequence_dim=True),
    _spec("SpatialRescaler", "img", multiplier=0.5, in_channels=3, out_channels=2),
    _spec("IdentityEncoder", "lowres"),
]


def test_fourier_fixture_parity():
    f = FIXTURES / "text" / "fourier256.npz"
    if not f.is_file():
        pytest.skip(f"fixture {f} absent (needs the shared fixtures folder)")
    d = np.load(f)
    dim = int(d["outdim"])
    out = np.asarray(ConcatTimestepEmbedderND(dim).apply({}, jnp.asarray(d["x"])))
    chex.assert_shape(out, d["output"].shape)
    # cos(x * f) in float32 with x up to ~1344: one ulp of a frequency f (torch takes exp
    # from MKL, XLA from its own polynomial; neither is bit-reproducible elsewhere) moves
    # the argument by |x| * f * 2^-23, up to ~7e-5. Demand 1e-5 plus that ill-conditioning.
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    cond_err = (np.abs(d["x"])[:, :, None] * np.tile(freqs, 2)[None, None, :] * 2.0**-22).reshape(out.shape)
    err = np.abs(out - d["output"])
    assert np.all(err <= 1e-5 + cond_err), err.max()
    assert np.mean(err <= 1e-5) > 0.99  # and almost everything within 1e-5 outright
    # Same through a conditioner: a rank-2 output lands in "vector".
    c = build_conditioner([_spec("ConcatTimestepEmbedderND", "original_size_as_tuple", outdim=256)])
    o = c.apply({}, {"original_size_as_tuple": jnp.asarray(d["x"])})
    np.testing.assert_array_equal(np.asarray(o["vector"]), out)


def test_grouping_order_and_param_names():
    c = build_conditioner(MIXED)
    batch = _batch()
    variables = c.init(jax.random.key(0), batch)
    p = variables["params"]
    assert set(p) == {"embedders_0", "embedders_3", "embedders_4"}  # parameter-free ones absent
    chex.assert_shape(p["embedders_0"]["embedding"]["embedding"], (10, 8))
    out = c.apply(variables, batch)
    assert list(out) == ["vector", "crossattn", "concat"]
    chex.assert_shape(out["vector"], (4, 8 + 2 * 6))
    chex.assert_shape(out["crossattn"], (4, 1, 2 + 5))
    chex.assert_shape(out["concat"], (4, 4, 4, 2 + 3))
    # Concatenation in embedder order along the last axis.
    parts = [m.apply({"params": p[f"embedders_{i}"]} if f"embedders_{i}" in p else {}, batch[s.input_key])
             for i, (s, m) in enumerate(zip(c.specs, [s.build() for s in c.specs]))]
    np.testing.assert_allclose(out["vector"], jnp.concatenate([parts[0], parts[1]], -1))
    np.testing.assert_allclose(out["crossattn"], jnp.concatenate([parts[2], parts[3]], -1))
    np.testing.assert_allclose(out["concat"], jnp.concatenate([parts[4], parts[5]], -1))


def test_registry_targets():
    assert cond.get_embedder_class(SEED_PREFIX + "ClassEmbedder") is cond.ClassEmbedder
    assert cond.get_embedder_class("IdentityEncoder") is cond.IdentityEncoder
    with pytest.raises(KeyError, match="unknown embedder"):
        cond.get_embedder_class("sgm.modules.encoders.modules.NoSuchEmbedder")
    with pytest.raises(KeyError, match="input_key"):
        build_conditioner([{"target": "IdentityEncoder"}])
    # The seed's UNCONDITIONAL_CONFIG: no embedders, no params, empty conditioning.
    empty = build_conditioner([])
    v = empty.init(jax.random.key(0), {"jpg": jnp.zeros((2, 4, 4, 1))})
    assert empty.apply(v, {"jpg": jnp.zeros((2, 4, 4, 1))}) == {}
    assert get_unconditional_conditioning(empty, v.get("params", {}), {}) == ({}, {})


def test_ucg_dropout_rate_and_independent_masks():
    n, rate = 4000, 0.3
    c = build_conditioner([
        _spec("ClassEmbedder", "cls", trainable=True, ucg=rate, embed_dim=4, n_classes=10),
        {**_spec("_TwoOutputs", "x", ucg=rate), "target": "_TwoOutputs"},
    ])
    batch = {"cls": jnp.arange(n) % 10, "x": jnp.ones((n, 3))}
    v = c.init(jax.random.key(0), batch)
    out = c.apply(v, batch, jax.random.key(1))
    dropped_cls = np.all(np.asarray(out["vector"][:, :4]) == 0, axis=-1)
    assert abs(dropped_cls.mean() - rate) < 0.03
    dropped_vec = np.all(np.asarray(out["vector"][:, 4:]) == 0, axis=-1)
    dropped_seq = np.all(np.asarray(out["crossattn"]) == 0, axis=(1, 2))
    assert abs(dropped_vec.mean() - rate) < 0.03 and abs(dropped_seq.mean() - rate) < 0.03
    # One mask per output, as the seed draws inside its loop: they disagree ~2p(1-p) of the time.
    assert abs((dropped_vec != dropped_seq).mean() - 2 * rate * (1 - rate)) < 0.04
    # Kept rows are untouched; no key -> no dropout at all.
    ref = c.apply(v, batch)
    np.testing.assert_array_equal(np.asarray(out["vector"])[~dropped_cls, :4], np.asarray(ref["vector"])[~dropped_cls, :4])
    assert not np.any(np.all(np.asarray(ref["vector"][:, :4]) == 0, axis=-1))


def test_legacy_ucg_value_replaces_input():
    n = 4000
    spec = {**_spec("IdentityEncoder", "x", ucg=0.3), "legacy_ucg_value": -1.0}
    c = build_conditioner([spec, _spec("IdentityEncoder", "x")])
    out = c.apply({}, {"x": jnp.ones((n, 2))}, jax.random.key(3))["vector"]
    replaced = np.asarray(out[:, 0]) == -1.0
    assert abs(replaced.mean() - 0.3) < 0.03
    assert np.all(np.isin(np.asarray(out), [1.0, -1.0]))  # replaced, never zeroed
    # As in the seed (in-place batch edit), a later embedder on the same key sees the value.
    np.testing.assert_array_equal(np.asarray(out[:, 2]), np.asarray(out[:, 0]))


def test_unconditional_conditioning_and_force_zero():
    c = build_conditioner([MIXED[0] | {"ucg_rate": 0.5}, MIXED[1]])
    batch = _batch()
    v = c.init(jax.random.key(0), batch)
    batch_uc = dict(batch, sz=batch["sz"] * 0 + 7.0)
    cc, uc = jax.jit(lambda p, b, bu: get_unconditional_conditioning(c, p, b, bu, force_uc_zero_embeddings=["cls"]))(
        v["params"], batch, batch_uc)
    ref_c = c.apply(v, batch)  # no key: ucg off, like the seed's temporary ucg_rate = 0
    np.testing.assert_allclose(cc["vector"], ref_c["vector"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(uc["vector"][:, :8]), 0.0)
    np.testing.assert_allclose(uc["vector"][:, 8:], c.apply(v, batch_uc)["vector"][:, 8:], atol=1e-6)
    # force_cond_zero_embeddings and batch_uc=None
    cc2, uc2 = get_unconditional_conditioning(c, v, batch, force_cond_zero_embeddings=["sz"])
    np.testing.assert_array_equal(np.asarray(cc2["vector"][:, 8:]), 0.0)
    np.testing.assert_allclose(uc2["vector"], ref_c["vector"], atol=1e-6)


def test_frozen_embedders_get_no_gradient_and_mask():
    c = build_conditioner(MIXED)
    batch = _batch()
    v = c.init(jax.random.key(0), batch)

    def loss(params, img):
        out = c.apply({"params": params}, dict(batch, img=img))
        return sum(jnp.sum(jnp.sin(x)) for x in out.values())

    g_params, g_img = jax.grad(loss, argnums=(0, 1))(v["params"], batch["img"])
    assert np.abs(np.asarray(g_params["embedders_0"]["embedding"]["embedding"])).sum() > 0
    for name in ("embedders_3", "embedders_4"):
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_params[name]))
    np.testing.assert_array_equal(np.asarray(g_img), 0.0)  # frozen rescaler/identity: no_grad
    mask = trainable_mask(c, v["params"])
    assert jax.tree.structure(mask) == jax.tree.structure(v["params"])
    assert mask["embedders_0"]["embedding"]["embedding"] is True
    assert mask["embedders_3"]["embedding"]["embedding"] is False
    assert not any(jax.tree.leaves(mask["embedders_4"]))
    assert trainable_mask(c, v)["params"]["embedders_0"]["embedding"]["embedding"] is True


def _torch_interpolate(x_nhwc, scale, method):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
    y = torch.nn.functional.interpolate(t, scale_factor=scale, mode=method)
    return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "area"])
@pytest.mark.parametrize("scale", [0.5, 2.0, 0.75])
def test_spatial_rescaler_matches_torch(method, scale):
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    y = cond.SpatialRescaler(method=method, multiplier=scale).apply({}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _torch_interpolate(x, scale, method), atol=1e-5)


SDXL_BASE = [  # the seed's configs/inference/sd_xl_base.yaml conditioner, verbatim
    {"is_trainable": False, "input_key": "txt", "target": SEED_PREFIX + "FrozenCLIPEmbedder",
     "params": {"layer": "hidden", "layer_idx": 11}},
    {"is_trainable": False, "input_key": "txt", "target": SEED_PREFIX + "FrozenOpenCLIPEmbedder2",
     "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
    _spec("ConcatTimestepEmbedderND", "original_size_as_tuple", outdim=256),
    _spec("ConcatTimestepEmbedderND", "crop_coords_top_left", outdim=256),
    _spec("ConcatTimestepEmbedderND", "target_size_as_tuple", outdim=256),
]


def _text_available():
    try:
        import sgm_jax.nn.text  # noqa: F401
    except ImportError as e:
        pytest.skip(f"sgm_jax.nn.text not importable: {e}")


def test_sdxl_base_shapes_with_real_sizes():
    _text_available()
    c = build_conditioner(SDXL_BASE)
    b = 2
    strings = {"txt": ["a photo of a cat", ""]}
    fake_tok = lambda texts: np.zeros((len(texts), 77), np.int32)  # noqa: E731
    batch = tokenize_batch(c, strings, {0: fake_tok, 1: fake_tok})
    assert set(batch) == {token_key("txt", 0), token_key("txt", 1)}
    batch.update({k: jnp.zeros((b, 2)) for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")})
    variables = jax.eval_shape(c.init, jax.random.key(0), batch)  # abstract: no 3 GB of weights
    out = jax.eval_shape(c.apply, variables, batch)
    assert out["crossattn"].shape == (b, 77, 768 + 1280)
    assert out["vector"].shape == (b, 1280 + 6 * 256)


def _tiny_text_conditioner(legacy_value, ucg):
    """Tiny CLIP-L (legacy ucg on "txt") + tiny OpenCLIP-G (no ucg of its own)."""
    tiny = {"vocab_size": 64, "width": 16, "heads": 2, "layers": 2, "max_length": 8}
    clip = {**SDXL_BASE[0], "params": {"layer": "hidden", "layer_idx": 1, **tiny}, "ucg_rate": ucg,
            "legacy_ucg_value": legacy_value}
    og = {**SDXL_BASE[1], "params": {**SDXL_BASE[1]["params"], **tiny, "embed_dim": 12}}
    return build_conditioner([clip, og])


def _toy_tokenizer(pad):
    # Deterministic toy ids (sot=62, eot=63) so the test needs no vocabulary file.
    def tok(texts):
        out = np.full((len(texts), 8), pad, np.int32)
        for row, t in zip(out, texts):
            ids = [62] + [1 + (ord(ch) % 60) for ch in t][:6] + [63]
            row[: len(ids)] = ids
        return out
    return tok


def test_text_tokenize_and_legacy_ucg():
    _text_available()
    c = _tiny_text_conditioner(legacy_value="", ucg=1.0)  # rate 1: every caption replaced
    toks = {0: _toy_tokenizer(63), 1: _toy_tokenizer(0)}
    batch = tokenize_batch(c, {"txt": ["a cat", "a dog"], "cls": np.array([1, 2])}, toks)
    assert "txt" not in batch and "cls" in batch
    assert batch[token_key("txt", 1)].dtype == np.int32
    v = c.init(jax.random.key(0), batch)
    dropped = c.apply(v, batch, jax.random.key(1))
    empty = tokenize_batch(c, {"txt": ["", ""]}, toks)
    ref = c.apply(v, empty)
    chex.assert_shape(dropped["crossattn"], (2, 8, 32))
    chex.assert_shape(dropped["vector"], (2, 12))
    np.testing.assert_allclose(dropped["crossattn"], ref["crossattn"], atol=1e-6)
    # Replaced, not zeroed; and OpenCLIP (later, same key) sees the replaced caption too.
    np.testing.assert_allclose(dropped["vector"], ref["vector"], atol=1e-6)
    assert np.abs(np.asarray(c.apply(v, batch)["crossattn"] - ref["crossattn"])).max() > 1e-4
    with pytest.raises(TypeError, match="tokenize_batch"):
        c.apply(v, {"txt": ["not tokenised"]})


def test_text_tokenizers_with_real_bpe():
    _text_available()
    bpe = SHARED / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        pytest.skip(f"CLIP BPE vocabulary {bpe} absent")
    from sgm_jax.nn.tokenizer import load_tokenizer

    c = build_conditioner(SDXL_BASE[:2])
    toks = cond.text_tokenizers(c, load_tokenizer(bpe))
    batch = tokenize_batch(c, {"txt": ["a photo of a cat"]}, toks)
    clip_ids, og_ids = batch[token_key("txt", 0)], batch[token_key("txt", 1)]
    chex.assert_shape([clip_ids, og_ids], (1, 77))
    assert clip_ids[0, 0] == 49406 and clip_ids[0, -1] == 49407  # CLIP-L pads with eot
    assert og_ids[0, -1] == 0  # OpenCLIP pads with 0
    np.testing.assert_array_equal(clip_ids[0, :7], og_ids[0, :7])
