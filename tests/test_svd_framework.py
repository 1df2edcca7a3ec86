"""Stable Video Diffusion's framework pieces: VScalingWithEDMcNoise, the per-frame CFG guiders
(LinearPredictionGuider, TrianglePredictionGuider) and the fps / motion / cond_aug embedder,
against numpy re-derivations of the seed's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.diffusion import discretization as disc
from sgm_jax.diffusion import samplers as smp
from sgm_jax.diffusion.denoiser import Denoiser
from sgm_jax.diffusion.guiders import LinearPredictionGuider, TrianglePredictionGuider, VanillaCFG, triangle_wave
from sgm_jax.diffusion.registry import instantiate_from_config
from sgm_jax.diffusion.scaling import VScaling, VScalingWithEDMcNoise
from sgm_jax.nn.conditioner import ConcatTimestepEmbedderND, build_conditioner
from sgm_jax.nn.layers import timestep_embedding

SIGMAS = np.array([0.002, 0.1, 0.5, 1.0, 7.0, 80.0, 700.0])
GUIDERS = "sgm.modules.diffusionmodules.guiders."

# ----------------------------------------------------------------------------- scaling


def test_v_scaling_with_edm_c_noise_formulas():
    c_skip, c_out, c_in, c_noise = (np.asarray(a, np.float64) for a in VScalingWithEDMcNoise()(jnp.asarray(SIGMAS)))
    np.testing.assert_allclose(c_skip, 1 / (SIGMAS**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_out, -SIGMAS / np.sqrt(SIGMAS**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(SIGMAS**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 0.25 * np.log(SIGMAS), rtol=1e-6)
    # spot values: sigma = 1 -> (1/2, -1/sqrt 2, 1/sqrt 2, 0); sigma = 700 (SVD's sigma_max)
    s1 = [float(np.asarray(a)) for a in VScalingWithEDMcNoise()(jnp.float32(1.0))]
    np.testing.assert_allclose(s1, [0.5, -math.sqrt(0.5), math.sqrt(0.5), 0.0], atol=1e-7)
    assert float(VScalingWithEDMcNoise()(jnp.float32(700.0))[3]) == pytest.approx(0.25 * math.log(700.0), rel=1e-6)
    # only c_noise differs from plain v-prediction
    for a, b in zip(VScalingWithEDMcNoise()(jnp.asarray(SIGMAS))[:3], VScaling()(jnp.asarray(SIGMAS))[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_v_scaling_with_edm_c_noise_from_seed_config_in_a_denoiser():
    den = instantiate_from_config({
        "target": "sgm.modules.diffusionmodules.denoiser.Denoiser",
        "params": {"scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.VScalingWithEDMcNoise"}}})
    assert isinstance(den, Denoiser) and isinstance(den.scaling, VScalingWithEDMcNoise)
    sigma = jnp.asarray([0.5, 7.0])
    x = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1) + 1.0
    seen = {}

    def network(x_in, c_noise, cond):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return jnp.full_like(x_in, 0.25)

    out = np.asarray(den(network, x, sigma, {}))
    s = np.asarray(sigma, np.float64)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(seen["c_noise"]), 0.25 * np.log([0.5, 7.0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(seen["x_in"]), np.asarray(x) / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(x) / (s**2 + 1) - 0.25 * s / np.sqrt(s**2 + 1), rtol=1e-6)


# ----------------------------------------------------------------------------- guiders


def seed_guided(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The seed's LinearPredictionGuider.__call__ in numpy: x [2*B*T, ...] ([uc; c]) and the
    [T] scale row, repeated over the B videos."""
    t = scale.shape[0]
    x_u, x_c = np.split(x.astype(np.float64), 2)
    x_u = x_u.reshape((-1, t) + x_u.shape[1:])
    x_c = x_c.reshape((-1, t) + x_c.shape[1:])
    s = np.repeat(scale[None], x_u.shape[0], 0).reshape(x_u.shape[:2] + (1,) * (x_u.ndim - 2))
    return (x_u + s * (x_c - x_u)).reshape((-1,) + x_u.shape[2:])


def _denoised(videos: int = 2, frames: int = 4, seed: int = 0) -> np.ndarray:
    """[2 * videos * frames, 3, 3, 2]: uc half then c half."""
    return np.random.default_rng(seed).normal(size=(2 * videos * frames, 3, 3, 2)).astype(np.float32)


def test_linear_guider_frame_ramp_two_videos():
    g = LinearPredictionGuider(max_scale=2.5, num_frames=4, min_scale=1.0)
    np.testing.assert_allclose(np.asarray(g.frame_scales()), [1.0, 1.5, 2.0, 2.5], rtol=1e-7)
    d = _denoised()
    out = np.asarray(g(jnp.asarray(d), jnp.ones(8)))
    assert out.shape == (8, 3, 3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, seed_guided(d, np.linspace(1.0, 2.5, 4)), rtol=1e-5, atol=1e-6)
    # rows 0..3 are video 0's frames, 4..7 video 1's: frame 0 of each is the plain cond prediction (scale 1)
    np.testing.assert_allclose(out[[0, 4]], d[8:][[0, 4]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[[3, 7]], (d[:8] + 2.5 * (d[8:] - d[:8]))[[3, 7]], rtol=1e-5, atol=1e-6)


def test_linear_guider_svd_14_frames_from_seed_config():
    g = instantiate_from_config({"target": GUIDERS + "LinearPredictionGuider",
                                 "params": {"max_scale": 2.5, "min_scale": 1.0, "num_frames": 14}})
    assert isinstance(g, LinearPredictionGuider) and g.additional_cond_keys == ()
    np.testing.assert_allclose(np.asarray(g.frame_scales()), np.linspace(1.0, 2.5, 14), rtol=1e-6)
    d = _denoised(videos=1, frames=14, seed=1)
    np.testing.assert_allclose(np.asarray(g(jnp.asarray(d), jnp.ones(14))), seed_guided(d, np.linspace(1.0, 2.5, 14)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guider", [
    LinearPredictionGuider(max_scale=3.0, num_frames=4, min_scale=3.0),
    TrianglePredictionGuider(max_scale=3.0, num_frames=4, min_scale=3.0, period=(1.0, 0.5), period_fusing="mean"),
])
def test_constant_ramp_is_vanilla_cfg(guider):
    d = jnp.asarray(_denoised(seed=2))
    np.testing.assert_allclose(np.asarray(guider(d, jnp.ones(8))), np.asarray(VanillaCFG(3.0)(d, jnp.ones(8))),
                               rtol=1e-6, atol=1e-6)


def test_triangle_wave_and_period_fusing():
    u = np.linspace(0, 1, 5).astype(np.float32)  # [0, .25, .5, .75, 1]
    np.testing.assert_allclose(triangle_wave(u, 1.0), [0, 0.5, 1, 0.5, 0], atol=1e-7)
    np.testing.assert_allclose(triangle_wave(u, 0.5), [0, 1, 0, 1, 0], atol=1e-7)
    want = {"mean": [0, 0.75, 0.5, 0.75, 0], "multiply": [0, 0.5, 0, 0.5, 0], "max": [0, 1, 1, 1, 0]}
    for fusing, w in want.items():
        g = TrianglePredictionGuider(max_scale=3.0, num_frames=5, min_scale=1.0, period=[1.0, 0.5], period_fusing=fusing)
        np.testing.assert_allclose(g.frame_weights(), w, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g.frame_scales()), 1.0 + 2.0 * np.asarray(w), atol=1e-6)
    # defaults: one period of 1.0, "max": min_scale at both ends, max_scale mid-video
    g = TrianglePredictionGuider(max_scale=3.0, num_frames=5)
    assert g.period == (1.0,) and g.period_fusing == "max"
    np.testing.assert_allclose(np.asarray(g.frame_scales()), [1, 2, 3, 2, 1], atol=1e-6)
    assert TrianglePredictionGuider(max_scale=2.0, num_frames=5, period=1).period == (1.0,)  # an int period works


def test_triangle_guider_against_numpy_two_videos():
    g = instantiate_from_config({"target": GUIDERS + "TrianglePredictionGuider",
                                 "params": {"max_scale": 2.5, "min_scale": 1.0, "num_frames": 6, "period": [1.0, 0.4],
                                            "period_fusing": "multiply"}})
    assert g.period == (1.0, 0.4) and hash(g) == hash(g)  # tuples: a hashable (static) guider
    u = np.linspace(0, 1, 6)
    tri = lambda p: 2 * np.abs(u / p - np.floor(u / p + 0.5))  # noqa: E731
    scale = tri(1.0) * tri(0.4) * 1.5 + 1.0
    d = _denoised(frames=6, seed=3)
    np.testing.assert_allclose(np.asarray(g(jnp.asarray(d), jnp.ones(12))), seed_guided(d, scale), rtol=1e-5, atol=1e-5)


def test_prepare_inputs_stacks_uc_and_c_for_the_seed_keys():
    b, t = 2, 4
    x = jnp.arange(b * t, dtype=jnp.float32).reshape(b * t, 1, 1, 1)
    sigma = jnp.full((b * t,), 3.0)
    cond = {"vector": jnp.ones((b * t, 5)), "crossattn": jnp.ones((b * t, 1, 3)), "concat": jnp.ones((b * t, 1, 1, 4)),
            "image_only_indicator": jnp.ones((b, t)), "cond_view": jnp.ones((b * t, 2)), "num_video_frames": t}
    uc = {k: (jnp.zeros_like(v) if k != "num_video_frames" else t) for k, v in cond.items()}
    g = LinearPredictionGuider(max_scale=2.0, num_frames=t, additional_cond_keys="image_only_indicator")
    assert g.additional_cond_keys == ("image_only_indicator",)
    xi, si, ci = g.prepare_inputs(x, sigma, cond, uc)
    np.testing.assert_array_equal(np.asarray(xi)[:, 0, 0, 0], np.tile(np.arange(8.0), 2))
    np.testing.assert_array_equal(np.asarray(si), np.full(16, 3.0))
    for k in ("vector", "crossattn", "concat", "image_only_indicator"):
        v = np.asarray(ci[k])
        assert v.shape[0] == 2 * cond[k].shape[0]
        np.testing.assert_array_equal(v[: v.shape[0] // 2], 0.0)  # [uc; c]
        np.testing.assert_array_equal(v[v.shape[0] // 2:], 1.0)
    assert ci["cond_view"] is cond["cond_view"] and ci["num_video_frames"] == t  # not listed: passed through
    # SV4D's keys
    g = TrianglePredictionGuider(max_scale=2.0, num_frames=t, additional_cond_keys=["cond_view"])
    assert g.prepare_inputs(x, sigma, cond, uc)[2]["cond_view"].shape == (16, 2)
    with pytest.raises(ValueError, match="scalar"):
        LinearPredictionGuider(2.0, t, additional_cond_keys=["num_video_frames"]).prepare_inputs(x, sigma, cond, uc)
    with pytest.raises(ValueError, match="uc lacks"):
        g.prepare_inputs(x, sigma, cond, {k: v for k, v in uc.items() if k != "cond_view"})
    with pytest.raises(ValueError, match="unconditional"):
        g.prepare_inputs(x, sigma, cond, None)


def test_guider_errors_tracer_scale_and_dtype():
    with pytest.raises(ValueError, match="whole number"):
        LinearPredictionGuider(2.0, num_frames=3)(jnp.zeros((8, 1)), jnp.ones(4))
    with pytest.raises(ValueError, match="num_frames"):
        LinearPredictionGuider(2.0, num_frames=0)
    with pytest.raises(ValueError, match="period_fusing"):
        TrianglePredictionGuider(2.0, num_frames=4, period_fusing="sum")
    d = jnp.asarray(_denoised(seed=4))
    # max_scale may be traced (built inside the jitted sampling function, as VanillaCFG)
    out = jax.jit(lambda s: LinearPredictionGuider(s, 4)(d, jnp.ones(8)))(jnp.float32(2.5))
    np.testing.assert_allclose(np.asarray(out), seed_guided(np.asarray(d), np.linspace(1, 2.5, 4)), rtol=1e-5, atol=1e-6)
    assert LinearPredictionGuider(2.5, 4)(d.astype(jnp.bfloat16), jnp.ones(8)).dtype == jnp.bfloat16


def test_guider_drops_into_a_sampler_frame_by_frame():
    """Frame t of each video, sampled with the ramp, is what VanillaCFG with scale[t] on that
    row gives it (the exact Gaussian denoiser treats every row independently)."""
    b, t, s = 2, 4, 0.5
    mu_c = jnp.linspace(-1.0, 1.0, b * t * 2).reshape(b * t, 2)

    def denoiser(x, sigma, cond):
        mu = cond["vector"][:, None, None, :]
        return mu + (x - mu) * s**2 / (s**2 + sigma[:, None, None, None] ** 2)

    noise = jax.random.normal(jax.random.key(0), (b * t, 2, 2, 2))
    cond, uc = {"vector": mu_c}, {"vector": jnp.zeros_like(mu_c)}

    def sample(guider):
        sampler = smp.EulerEDMSampler(num_steps=3, discretization=disc.EDMDiscretization(), guider=guider)
        return np.asarray(sampler(denoiser, noise, cond, uc=uc))

    ramp = sample(LinearPredictionGuider(max_scale=2.5, num_frames=t))
    per_row = jnp.asarray(np.tile(np.linspace(1.0, 2.5, t), b), jnp.float32).reshape(b * t, 1, 1, 1)
    np.testing.assert_allclose(ramp, sample(VanillaCFG(per_row)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- embedder


def np_timestep_embedding(x: np.ndarray, dim: int) -> np.ndarray:
    """The seed's timestep_embedding: [cos(x f), sin(x f)], f_i = 10000^(-i / half), zero-padded to odd dim."""
    half = dim // 2
    args = x[:, None].astype(np.float64) * np.exp(-math.log(10000.0) * np.arange(half) / half)[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], -1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


def test_concat_timestep_embedder_columns():
    x = jnp.asarray([[6.0, 127.0, 0.02], [24.0, 0.0, 1.0]])
    out = np.asarray(ConcatTimestepEmbedderND(outdim=8).apply({}, x))
    assert out.shape == (2, 24)
    want = np.concatenate([np_timestep_embedding(np.asarray(x[:, j]), 8) for j in range(3)], -1)
    np.testing.assert_allclose(out, want, atol=2e-6)
    odd = np.asarray(ConcatTimestepEmbedderND(outdim=5).apply({}, jnp.asarray([3.0, 9.0])))  # [B] -> [B, 1 * 5]
    np.testing.assert_allclose(odd, np_timestep_embedding(np.asarray([3.0, 9.0]), 5), atol=2e-6)
    assert np.all(odd[:, -1] == 0.0)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, D\]"):
        ConcatTimestepEmbedderND(outdim=4).apply({}, jnp.zeros((2, 2, 2)))


def test_svd_micro_conditioning_vector():
    """SVD's fps_id, motion_bucket_id and cond_aug embedders (outdim 256 each) fill "vector"
    [B, 768] (the VideoUNet's adm_in_channels) in yaml order."""
    prefix = "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"
    specs = [{"input_key": k, "is_trainable": False, "target": prefix, "params": {"outdim": 256}}
             for k in ("fps_id", "motion_bucket_id", "cond_aug")]
    conditioner = build_conditioner(specs)
    batch = {"fps_id": jnp.asarray([5.0, 6.0]), "motion_bucket_id": jnp.asarray([127.0, 40.0]),
             "cond_aug": jnp.asarray([0.02, 0.0])}
    assert conditioner.init(jax.random.key(0), batch) == {}  # parameter-free
    out = conditioner.apply({}, batch)
    assert set(out) == {"vector"} and out["vector"].shape == (2, 768)
    want = jnp.concatenate([timestep_embedding(batch[k], 256) for k in ("fps_id", "motion_bucket_id", "cond_aug")], -1)
    np.testing.assert_array_equal(np.asarray(out["vector"]), np.asarray(want))
    np.testing.assert_allclose(np.asarray(out["vector"][:, 256:512]), np_timestep_embedding(np.asarray([127.0, 40.0]), 256),
                               atol=5e-5)
