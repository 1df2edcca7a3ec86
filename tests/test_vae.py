"""AutoencoderKL: parity with the seed's fixture, posterior maths, key mapping round trip."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.convert.common import CheckpointMismatchError
from sgm_jax.convert.vae import VAE_PREFIX, abstract_vae_params, convert_vae, export_vae
from sgm_jax.nn.vae import AutoencoderKL, DiagonalGaussianDistribution

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
KL_TINY = FIXTURES / "vae" / "kl_tiny"
TOL = 1e-4


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def kl_tiny():
    if not KL_TINY.with_suffix(".safetensors").exists():
        pytest.skip(f"VAE fixture not found at {KL_TINY}.* (the shared reference fixtures are absent)")
    from safetensors.numpy import load_file

    cfg = json.loads(KL_TINY.with_suffix(".json").read_text())
    state_dict = load_file(str(KL_TINY.with_suffix(".safetensors")))
    model = AutoencoderKL(cfg["embed_dim"], cfg["ddconfig"])
    return model, state_dict, convert_vae(state_dict, model), dict(np.load(KL_TINY.with_suffix(".npz")))


def test_fixture_parity(kl_tiny):
    model, _, params, ref = kl_tiny
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
        moments = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(
            params, nhwc(ref["image_nchw"]))
        decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(
            params, nhwc(ref["z_nchw"]))
    chex.assert_shape(moments, nhwc(ref["moments_nchw"]).shape)
    chex.assert_shape(decoded, nhwc(ref["decoded_nchw"]).shape)
    chex.assert_type([moments, decoded], jnp.float32)
    assert rel_err(moments, nhwc(ref["moments_nchw"])) <= TOL
    assert rel_err(decoded, nhwc(ref["decoded_nchw"])) <= TOL


def test_posterior_matches_seed_maths():
    rng = np.random.default_rng(0)
    moments = rng.normal(size=(2, 4, 4, 8)).astype(np.float32) * 3
    moments[0, 0, 0, 4] = -100.0  # logvar clamp at -30
    post = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments))
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30, 20)
    np.testing.assert_allclose(post.mode(), mean)
    np.testing.assert_allclose(post.logvar, logvar)
    kl_ref = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), kl_ref, rtol=1e-5)
    sample = post.sample(jax.random.key(0))
    chex.assert_shape([sample, post.kl()], [(2, 4, 4, 4), (2,)])
    # sample = mean + std * eps, with eps the key's standard normal draw.
    eps = jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(sample, mean + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
    # A posterior is a pytree: it can leave a jitted function.
    jitted = jax.jit(DiagonalGaussianDistribution.from_moments)(jnp.asarray(moments))
    np.testing.assert_allclose(jitted.mean, mean)


def test_roundtrip_export_convert_bit_exact(kl_tiny):
    model, state_dict, params, _ = kl_tiny
    exported = export_vae(params)
    assert set(exported) == set(state_dict)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[key])
    again = convert_vae(exported, model)
    chex.assert_trees_all_equal(again, params)


def test_missing_key_is_named(kl_tiny):
    model, state_dict, _, _ = kl_tiny
    broken = dict(state_dict)
    del broken[VAE_PREFIX + "decoder.mid.attn_1.q.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.mid\.attn_1\.q\.weight"):
        convert_vae(broken, model)


def _small_config(**overrides):
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0, attn_type="vanilla")
    ddconfig.update(overrides)
    return ddconfig


def test_attention_levels_follow_seed_key_names():
    # attn_resolutions=[8] at resolution 16: the seed puts attention in down.1 and up.1.
    keys = set(export_vae(random_params(abstract_vae_params(AutoencoderKL(4, _small_config())))))
    assert "encoder.down.1.attn.0.q.weight" in {k[len(VAE_PREFIX):] for k in keys}
    assert {"decoder.up.1.attn.0.k.weight", "decoder.up.1.attn.1.v.weight", "decoder.up.1.upsample.conv.weight",
            "encoder.down.0.downsample.conv.bias", "decoder.mid.attn_1.proj_out.weight"} <= {
        k[len(VAE_PREFIX):] for k in keys}
    assert not any(".down.0.attn" in k or ".up.0.attn" in k for k in keys)


def random_params(abstract, seed: int = 0, scale: float = 0.1):
    """Random numpy params for an abstract tree (model.init would compile threefry: slow on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * scale).astype(s.dtype), abstract)


def test_tuple_config_and_bfloat16_compute():
    cfg_list, cfg_tuple = _small_config(), _small_config(ch_mult=(1, 2), attn_resolutions=(8,))
    model = AutoencoderKL(4, cfg_list)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    abstract = abstract_vae_params(model)
    chex.assert_trees_all_equal_shapes(abstract, abstract_vae_params(AutoencoderKL(4, cfg_tuple)))
    params = random_params(abstract)
    z, decoded, posterior = jax.jit(lambda p, x, k: model.apply({"params": p}, x, key=k))(params, x, jax.random.key(2))
    chex.assert_shape([z, decoded], [(1, 8, 8, 4), (1, 16, 16, 3)])
    low = AutoencoderKL(4, cfg_tuple, dtype=jnp.bfloat16)
    moments16 = jax.jit(lambda p, x: low.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    moments32 = jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)  # logvar far from the clamp
    chex.assert_type(moments16, jnp.bfloat16)
    assert rel_err(moments16, moments32) < 5e-2
