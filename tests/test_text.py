"""Text encoders and tokenizer: seed fixture parity, transformers parity, key maps, tokenisation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.convert.common import CheckpointMismatchError
from sgm_jax.convert.text import (
    CLIP_L_PREFIX, OPENCLIP_G_PREFIX, OPENCLIP_H_PREFIX, convert_clip_l, convert_openclip, export_clip_l,
    export_openclip,
)
from sgm_jax.nn.text import CLIPTextTransformer, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from sgm_jax.nn.tokenizer import BPE_FILENAME, USER_BPE_PATH, load_tokenizer, tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT = SHARED / "fixtures" / "text"
TOL = 1e-4


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def load_fixture(name: str):
    base = TEXT / name
    if not base.with_suffix(".safetensors").exists():
        pytest.skip(f"text fixture not found at {base}.* (the shared reference fixtures are absent)")
    from safetensors.numpy import load_file

    return (json.loads(base.with_suffix(".json").read_text()), load_file(str(base.with_suffix(".safetensors"))),
            dict(np.load(base.with_suffix(".npz"))))


def run(embedder, params, ids):
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
        return jax.jit(lambda p, t: embedder.apply({"params": p}, t))(params, jnp.asarray(ids, jnp.int32))


# ---------------------------------------------------------------------------- CLIP-L


def all_hidden_states(arch, params, ids) -> list[jax.Array]:
    """Every entry of hidden_states in one compiled call (the embedder returns one)."""
    tower = CLIPTextTransformer(**{k: v for k, v in arch.items()})
    with jax.default_matmul_precision("highest"):
        apply = jax.jit(lambda p, t: tower.apply({"params": p}, t)["hidden_states"])
        return apply(params["transformer"], jnp.asarray(ids, jnp.int32))


@pytest.fixture(scope="module")
def clip_l():
    cfg, state_dict, ref = load_fixture("clip_l_tiny")
    arch = dict(vocab_size=cfg["vocab_size"], width=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
                max_length=cfg["max_position_embeddings"], act=cfg["hidden_act"])
    params = convert_clip_l(state_dict, FrozenCLIPEmbedder(**arch))
    return arch, state_dict, params, ref


def test_clip_l_fixture_parity(clip_l):
    arch, _, params, ref = clip_l
    z, pooled = run(FrozenCLIPEmbedder(layer="last", always_return_pooled=True, **arch), params, ref["input_ids"])
    chex.assert_shape([z, pooled], [ref["last_hidden_state"].shape, ref["pooler_output"].shape])
    chex.assert_type([z, pooled], jnp.float32)
    assert rel_err(z, ref["last_hidden_state"]) <= TOL
    assert rel_err(pooled, ref["pooler_output"]) <= TOL
    z = run(FrozenCLIPEmbedder(layer="pooled", **arch), params, ref["input_ids"])
    assert z.shape == (2, 1, arch["width"]) and rel_err(z[:, 0], ref["pooler_output"]) <= TOL
    for k, h in enumerate(all_hidden_states(arch, params, ref["input_ids"])):
        assert rel_err(h, ref[f"hidden_states_{k}"]) <= TOL, k
    hidden = FrozenCLIPEmbedder(layer="hidden", layer_idx=int(ref["layer_idx"]), always_return_pooled=True, **arch)
    z, pooled = run(hidden, params, ref["input_ids"])
    assert rel_err(z, ref["hidden"]) <= TOL and rel_err(pooled, ref["pooler_output"]) <= TOL


def test_clip_l_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everything, norms included
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    ids = np.full((2, 77), 98, np.int64)  # eot = vocab_size - 1, padded with eot like CLIP-L
    ids[0, :4], ids[1, :9] = [97, 5, 6, 98], [97, 10, 20, 30, 40, 50, 60, 70, 98]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    arch = dict(vocab_size=99, width=32, layers=2, heads=4, intermediate_size=80)
    params = convert_clip_l(state_dict, FrozenCLIPEmbedder(**arch), prefix="")
    z, pooled = run(FrozenCLIPEmbedder(always_return_pooled=True, **arch), params, ids)
    assert rel_err(z, out.last_hidden_state.numpy()) <= TOL
    assert rel_err(pooled, out.pooler_output.numpy()) <= TOL
    ours = all_hidden_states(arch, params, ids)
    assert len(ours) == len(out.hidden_states) == 3
    for k, h in enumerate(out.hidden_states):
        assert rel_err(ours[k], h.numpy()) <= TOL, k
    z = run(FrozenCLIPEmbedder(layer="hidden", layer_idx=-2, **arch), params, ids)
    assert rel_err(z, out.hidden_states[-2].numpy()) <= TOL


@pytest.mark.parametrize("text_model", [True, False])
def test_clip_l_roundtrip_bit_exact(clip_l, text_model):
    arch, state_dict, params, _ = clip_l
    exported = export_clip_l(params, text_model=text_model)
    nested = CLIP_L_PREFIX + ("text_model." if text_model else "")
    assert nested + "encoder.layers.0.self_attn.q_proj.weight" in exported
    chex.assert_trees_all_equal(convert_clip_l(exported, FrozenCLIPEmbedder(**arch)), params)
    for key, value in export_clip_l(params, text_model=False).items():
        np.testing.assert_array_equal(value, state_dict[key])


def test_clip_l_missing_key_is_named(clip_l):
    arch, state_dict, _, _ = clip_l
    broken = {k: v for k, v in state_dict.items() if not k.endswith("layers.1.mlp.fc2.bias")}
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp\.fc2\.bias"):
        convert_clip_l(broken, FrozenCLIPEmbedder(**arch))


# ---------------------------------------------------------------------------- OpenCLIP


@pytest.fixture(scope="module")
def openclip_g():
    cfg, state_dict, ref = load_fixture("openclip_g_tiny")
    t = cfg["text_cfg"]
    arch = dict(vocab_size=t["vocab_size"], width=t["width"], heads=t["heads"], layers=t["layers"],
                embed_dim=cfg["embed_dim"], max_length=t["context_length"])
    params = convert_openclip(state_dict, FrozenOpenCLIPEmbedder2(**arch), prefix=cfg["prefix"])
    return arch, state_dict, params, ref


def _ln_final(x: np.ndarray, state_dict, prefix: str) -> np.ndarray:
    x = x.astype(np.float64)
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return normed * state_dict[prefix + "ln_final.weight"] + state_dict[prefix + "ln_final.bias"]


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_fixture_parity(openclip_g, layer):
    arch, state_dict, params, ref = openclip_g
    sdxl = FrozenOpenCLIPEmbedder2(layer=layer, always_return_pooled=True, legacy=False, **arch)
    z, pooled = run(sdxl, params, ref["input_ids"])
    chex.assert_shape([z, pooled], [ref[layer].shape, ref["pooled"].shape])
    chex.assert_type([z, pooled], jnp.float32)
    assert rel_err(z, ref[layer]) <= TOL and rel_err(pooled, ref["pooled"]) <= TOL
    assert rel_err(run(FrozenOpenCLIPEmbedder2(layer=layer, legacy=False, **arch), params, ref["input_ids"]),
                   ref[layer]) <= TOL
    # legacy=True (the seed's default) and SD 2.x's FrozenOpenCLIPEmbedder apply ln_final.
    want = _ln_final(ref[layer], state_dict, OPENCLIP_G_PREFIX)
    assert rel_err(run(FrozenOpenCLIPEmbedder2(layer=layer, **arch), params, ref["input_ids"]), want) <= TOL
    sd2 = {OPENCLIP_H_PREFIX + k[len(OPENCLIP_G_PREFIX):]: v for k, v in state_dict.items()}
    sd2_embedder = FrozenOpenCLIPEmbedder(layer=layer, **arch)
    sd2_params = convert_openclip(sd2, sd2_embedder, prefix=OPENCLIP_H_PREFIX)
    assert rel_err(run(sd2_embedder, sd2_params, ref["input_ids"]), want) <= TOL


def test_openclip_roundtrip_and_missing_key(openclip_g):
    arch, state_dict, params, _ = openclip_g
    exported = export_openclip(params)
    assert set(exported) == set(state_dict) - {OPENCLIP_G_PREFIX + "logit_scale"}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[key])
    chex.assert_trees_all_equal(convert_openclip(exported, FrozenOpenCLIPEmbedder2(**arch)), params)
    del exported[OPENCLIP_G_PREFIX + "transformer.resblocks.2.attn.in_proj_weight"]
    with pytest.raises(CheckpointMismatchError, match=r"resblocks\.2\.attn\.in_proj_weight"):
        convert_openclip(exported, FrozenOpenCLIPEmbedder2(**arch))


def test_embedder_defaults_and_checks():
    assert FrozenCLIPEmbedder.pad_token == "eot"
    assert FrozenOpenCLIPEmbedder2.pad_token == 0 and FrozenOpenCLIPEmbedder.pad_token == 0
    assert FrozenOpenCLIPEmbedder2().dims() == dict(width=1280, heads=20, layers=32, embed_dim=1280)
    assert FrozenOpenCLIPEmbedder().dims() == dict(width=1024, heads=16, layers=24, embed_dim=1024)
    tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    with pytest.raises(ValueError, match="legacy"):
        jax.eval_shape(lambda t: FrozenOpenCLIPEmbedder2(always_return_pooled=True).init(jax.random.key(0), t), tokens)
    with pytest.raises(ValueError, match="layer"):
        jax.eval_shape(lambda t: FrozenCLIPEmbedder(layer="hidden").init(jax.random.key(0), t), tokens)


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    for path in (SHARED / "data" / "clip" / BPE_FILENAME, USER_BPE_PATH):
        if path.is_file():
            return path
    pytest.skip(f"{BPE_FILENAME} not found (put it at {USER_BPE_PATH})")


@pytest.fixture(scope="module")
def tokenizer(bpe_path):
    return load_tokenizer(bpe_path)


def test_tokenize_matches_clip(tokenizer):
    clip = tokenize(tokenizer, ["a photo of a cat"], pad_token=FrozenCLIPEmbedder.pad_token)
    openclip = tokenize(tokenizer, ["a photo of a cat"], pad_token=FrozenOpenCLIPEmbedder2.pad_token)
    head = [49406, 320, 1125, 539, 320, 2368, 49407]
    chex.assert_shape([clip, openclip], [(1, 77), (1, 77)])
    chex.assert_type([clip, openclip], np.int32)
    np.testing.assert_array_equal(clip[0], head + [49407] * 70)
    np.testing.assert_array_equal(openclip[0], head + [0] * 70)


def test_tokenize_truncates_keeping_eot(tokenizer):
    ids = tokenize(tokenizer, ["a photo of a cat " * 40, "short"], pad_token=0)
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and 49407 not in ids[0, :76]
    assert ids[1, 0] == 49406 and ids[1, 2] == 49407 and not ids[1, 3:].any()


def test_tokenizer_from_checkpoint_folder(tokenizer, bpe_path, tmp_path):
    # A diffusers-style folder: tokenizer_2/ with vocab.json + merges.txt.
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    loaded = load_tokenizer(tmp_path, subfolder="tokenizer_2")
    text = ["A Photo of a CAT, hello world!"]
    np.testing.assert_array_equal(tokenize(loaded, text), tokenize(tokenizer, text))


def test_missing_tokenizer_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=BPE_FILENAME):
        load_tokenizer(tmp_path / "nowhere")
