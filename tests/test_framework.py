"""Scalings, weightings, discretizations, denoisers, guiders, loss: against the seed's formulas."""

from __future__ import annotations

from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from sgm_jax.diffusion import denoiser as den
from sgm_jax.diffusion import discretization as disc
from sgm_jax.diffusion import guiders, loss, scaling, sigma_sampling, weighting
from sgm_jax.diffusion.registry import instantiate_from_config

SIGMAS = np.geomspace(1e-3, 200.0, 257)


def _seed_scalings(name: str, s: np.ndarray, sd: float):
    """The seed's formulas, written independently in numpy (float64)."""
    if name == "edm":
        return sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1 / np.sqrt(s**2 + sd**2), 0.25 * np.log(s)
    if name == "eps":
        return np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), s
    v = (1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1))
    return v + ((s,) if name == "v" else (0.25 * np.log(s),))


SCALINGS = {
    "edm": (scaling.EDMScaling(0.5), 0.5, "edm_sd0.5"),
    "eps": (scaling.EpsScaling(), 1.0, "eps"),
    "v": (scaling.VScaling(), 1.0, "v_sd1.0"),
    "v_edm": (scaling.VScalingWithEDMcNoise(), 1.0, "v_edm_cnoise_sd1.0"),
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaling_matches_seed_formula_at_many_sigmas(name):
    obj, sd, _ = SCALINGS[name]
    got = obj(jnp.asarray(SIGMAS, jnp.float32))
    want = _seed_scalings(name.split("_")[0] if name != "v_edm" else "v_edm", SIGMAS, sd)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaling_matches_seed_fixture(name):
    ref = np.load(fixture_path("framework", "reference.npz"))
    obj, _, key = SCALINGS[name]
    got = obj(jnp.asarray(ref["sigmas_in"]))
    for part, g in zip(("c_skip", "c_out", "c_in", "c_noise"), got):
        np.testing.assert_allclose(np.asarray(g), ref[f"{key}.{part}"], rtol=1e-6, atol=1e-7, err_msg=part)


@pytest.mark.parametrize(
    "w, s, c_out",
    [
        (weighting.EDMWeighting(0.5), scaling.EDMScaling(0.5), None),
        (weighting.VWeighting(), scaling.VScaling(), None),
        (weighting.EpsWeighting(), scaling.EpsScaling(), None),
    ],
)
def test_weighting_is_inverse_square_of_c_out(w, s, c_out):
    # each weighting makes the network's regression target unit-weighted: w = 1 / c_out^2
    sig = jnp.asarray(SIGMAS)
    np.testing.assert_allclose(np.asarray(w(sig)), 1.0 / np.asarray(s(sig)[1]) ** 2, rtol=1e-5)


def test_weightings_formulas():
    sig = jnp.asarray(SIGMAS)
    np.testing.assert_array_equal(np.asarray(weighting.UnitWeighting()(sig)), np.ones_like(SIGMAS))
    np.testing.assert_allclose(np.asarray(weighting.EDMWeighting(0.7)(sig)),
                               (SIGMAS**2 + 0.49) / (SIGMAS * 0.7) ** 2, rtol=1e-5)
    assert weighting.VWeighting().sigma_data == 1.0
    np.testing.assert_allclose(np.asarray(weighting.EpsWeighting()(sig)), SIGMAS**-2.0, rtol=1e-5)


DISCS = {
    "edm": disc.EDMDiscretization(),
    "edm_custom": disc.EDMDiscretization(sigma_min=0.01, sigma_max=20.0, rho=5.0),
    "ddpm": disc.LegacyDDPMDiscretization(),
}


@pytest.mark.parametrize("n", [1, 2, 10, 50])
@pytest.mark.parametrize("name", ["edm", "edm_custom", "ddpm", "ddpm_noappend_flip"])
def test_discretization_matches_seed_fixture(name, n):
    ref = np.load(fixture_path("framework", "reference.npz"))
    kwargs = dict(do_append_zero=False, flip=True) if name == "ddpm_noappend_flip" else {}
    got = DISCS[name.split("_noappend")[0]](n, **kwargs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref[f"{name}.n{n}"], rtol=2e-6, atol=0)


def test_ddpm_table_of_discrete_denoiser_matches_fixture():
    ref = np.load(fixture_path("framework", "reference.npz"))["ddpm.n1000"]
    d = den.DiscreteDenoiser(scaling=scaling.EpsScaling(), num_idx=1000, discretization=disc.LegacyDDPMDiscretization())
    np.testing.assert_allclose(d.sigmas, ref, rtol=2e-6)


def test_edm_discretization_formula():
    n, smin, smax, rho = 37, 0.002, 80.0, 7.0
    ramp = np.linspace(0, 1, n)
    want = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = disc.EDMDiscretization()(n)
    assert got.shape == (n + 1,) and got[-1] == 0.0
    np.testing.assert_allclose(got[:-1], want, rtol=1e-5)
    np.testing.assert_array_equal(disc.EDMDiscretization()(n, flip=True), got[::-1])


def test_ddpm_discretization_formula_at_full_length():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    want = np.sqrt((1 - ac) / ac)[::-1]
    np.testing.assert_allclose(disc.LegacyDDPMDiscretization()(1000, do_append_zero=False), want, rtol=1e-6)
    with pytest.raises(ValueError, match="1000 timesteps"):
        disc.LegacyDDPMDiscretization()(1001)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_number_of_steps_is_one_clear_line(n):
    with pytest.raises(ValueError, match="number of steps must be an integer >= 1") as info:
        disc.EDMDiscretization()(n)
    assert "\n" not in str(info.value)


def test_img2img_and_txt2noisy_wrappers_prune_like_the_seed():
    base = disc.EDMDiscretization()
    full = base(10)
    np.testing.assert_array_equal(disc.Img2ImgDiscretizationWrapper(base, 1.0)(10), full)
    # strength 0.5 keeps the int(0.5 * 11) = 5 smallest sigmas
    np.testing.assert_array_equal(disc.Img2ImgDiscretizationWrapper(base, 0.5)(10), full[-5:])
    np.testing.assert_array_equal(disc.Img2ImgDiscretizationWrapper(base, 0.0)(10), full[-1:])
    # the base model of an SDXL hand-off stops early: strength 0.2 of 10 steps drops int(0.2*11)-1 = 1
    np.testing.assert_array_equal(disc.Txt2NoisyDiscretizationWrapper(base, 0.2, original_steps=10)(10), full[:-1])
    np.testing.assert_array_equal(disc.Txt2NoisyDiscretizationWrapper(base, 0.0)(10), full)
    with pytest.raises(ValueError, match="strength"):
        disc.Img2ImgDiscretizationWrapper(base, 1.5)


def test_edm_sigma_sampling_is_log_normal():
    sig = np.asarray(sigma_sampling.EDMSampling(p_mean=-1.2, p_std=1.2)(jax.random.key(0), 200_000))
    assert abs(np.log(sig).mean() + 1.2) < 0.01 and abs(np.log(sig).std() - 1.2) < 0.01


def test_discrete_sigma_sampling_draws_table_levels_uniformly():
    sampler = sigma_sampling.DiscreteSampling(disc.LegacyDDPMDiscretization(), num_idx=1000)
    sig = np.asarray(sampler(jax.random.key(1), 100_000))
    idx = np.searchsorted(sampler.sigmas, sig)
    np.testing.assert_allclose(sampler.sigmas[idx], sig, rtol=1e-6)  # every draw is a level
    counts = np.bincount(idx // 100, minlength=10)  # 10 bins of 100 levels
    assert np.all(np.abs(counts / 100_000 - 0.1) < 0.006)


def test_denoiser_composes_scalings_with_the_network():
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
    sigma = jnp.array([0.1, 1.0, 10.0])
    net = lambda xin, c_noise, cond: 2.0 * xin + c_noise[:, None, None, None] + cond["vector"][:, None, None, :]
    cond = {"vector": jnp.ones((3, 2))}
    c_skip, c_out, c_in, c_noise = scaling.EDMScaling()(sigma[:, None, None, None])
    want = (2.0 * x * c_in + c_noise + 1.0) * c_out + x * c_skip
    got = den.Denoiser(scaling.EDMScaling())(net, x, sigma, cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_discrete_denoiser_quantises_sigma_and_feeds_the_index():
    d = den.DiscreteDenoiser(scaling=scaling.EpsScaling(), num_idx=1000, discretization=disc.LegacyDDPMDiscretization())
    table = d.sigmas
    sigma = jnp.asarray([table[0] * 1.001, table[500] * 0.999, table[999] * 1.2, 1000.0])
    seen = {}

    def net(xin, c_noise, cond):
        seen["t"] = c_noise
        return jnp.zeros_like(xin)

    x = jnp.ones((4, 2, 2, 1))
    out = d(net, x, sigma, {})
    np.testing.assert_array_equal(np.asarray(seen["t"]), [0, 500, 999, 999])
    np.testing.assert_array_equal(np.asarray(out), np.ones((4, 2, 2, 1)))  # eps c_skip = 1
    np.testing.assert_allclose(np.asarray(d.possibly_quantize_sigma(sigma)), table[[0, 500, 999, 999]])


def test_vanilla_cfg_doubles_the_batch_like_the_seed():
    g = guiders.VanillaCFG(scale=5.0)
    x = jnp.arange(2.0).reshape(2, 1, 1, 1)
    c = {"vector": jnp.ones((2, 3)), "crossattn": jnp.ones((2, 4, 5)), "concat": jnp.ones((2, 1, 1, 2)), "extra": 7}
    uc = {k: (jnp.zeros_like(v) if k != "extra" else 7) for k, v in c.items()}
    xx, ss, cc = g.prepare_inputs(x, jnp.array([1.0, 2.0]), c, uc)
    chex.assert_shape([xx, ss, cc["vector"], cc["crossattn"]], [(4, 1, 1, 1), (4,), (4, 3), (4, 4, 5)])
    np.testing.assert_array_equal(np.asarray(cc["vector"][:2]), 0.0)  # uc first, as the seed
    np.testing.assert_array_equal(np.asarray(cc["vector"][2:]), 1.0)
    assert cc["extra"] == 7
    out = g(jnp.concatenate([jnp.full((2, 1), 1.0), jnp.full((2, 1), 3.0)]), ss)
    np.testing.assert_allclose(np.asarray(out), 1.0 + 5.0 * 2.0)
    with pytest.raises(ValueError, match="unconditional"):
        g.prepare_inputs(x, jnp.ones(2), c, None)


def test_dynamic_thresholding_bounds_the_prediction():
    g = guiders.VanillaCFG(scale=7.0, dyn_thresh=guiders.DynamicThresholding(percentile=0.9))
    d = jax.random.normal(jax.random.key(3), (4, 8, 8, 3)) * 3.0
    out = np.asarray(g(d, jnp.ones(4)))
    assert np.abs(out).max() <= 1.0 + 1e-6
    np.testing.assert_allclose(
        np.asarray(guiders.NoDynamicThresholding()(d[:2], d[2:], 7.0)), np.asarray(d[:2] + 7.0 * (d[2:] - d[:2])),
        rtol=1e-6)


@dataclass(frozen=True)
class ConstantSigma:
    sigma: float

    def __call__(self, key, n):
        return jnp.full((n,), self.sigma)


def _gaussian_exact_denoise(s):
    return lambda params, xn, sig, cond: xn * s**2 / (s**2 + sig[:, None, None, None] ** 2)


@pytest.mark.parametrize("sig", [0.05, 0.5, 5.0])
def test_edm_weighted_l2_loss_of_the_exact_denoiser_is_one(sig):
    # data ~ N(0, s^2): the ideal denoiser's error variance is s^2 sig^2 / (s^2 + sig^2),
    # exactly 1 / EDMWeighting(s): the weighted loss has expectation 1 at every sigma
    s = 0.5
    x = s * jax.random.normal(jax.random.key(4), (64, 16, 16, 1))
    fn = loss.StandardDiffusionLoss(ConstantSigma(sig), weighting.EDMWeighting(s))
    per_example = fn(_gaussian_exact_denoise(s), None, x, {}, jax.random.key(5))
    chex.assert_shape(per_example, (64,))
    assert abs(float(per_example.mean()) - 1.0) < 0.03


def test_l1_loss_of_the_exact_denoiser_is_half_normal_mean():
    s, sig = 0.5, 0.8
    x = s * jax.random.normal(jax.random.key(6), (64, 16, 16, 1))
    fn = loss.StandardDiffusionLoss(ConstantSigma(sig), weighting.UnitWeighting(), loss_type="l1")
    got = float(fn(_gaussian_exact_denoise(s), None, x, {}, jax.random.key(7)).mean())
    want = np.sqrt(2 / np.pi) * s * sig / np.sqrt(s**2 + sig**2)
    assert abs(got / want - 1) < 0.02


def test_offset_noise_adds_per_channel_variance():
    x = jnp.zeros((256, 8, 8, 3))
    identity = lambda params, xn, sig, cond: xn
    plain = loss.StandardDiffusionLoss(ConstantSigma(1.0), weighting.UnitWeighting())
    offset = loss.StandardDiffusionLoss(ConstantSigma(1.0), weighting.UnitWeighting(), offset_noise_level=0.5)
    assert abs(float(plain(identity, None, x, {}, jax.random.key(8)).mean()) - 1.0) < 0.02
    assert abs(float(offset(identity, None, x, {}, jax.random.key(8)).mean()) - 1.25) < 0.06
    with pytest.raises(ValueError, match="loss_type"):
        loss.StandardDiffusionLoss(ConstantSigma(1.0), weighting.UnitWeighting(), loss_type="lpips2")


def test_instantiate_from_seed_style_config():
    cfg = {
        "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
        "params": {
            "num_idx": 1000,
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
        },
    }
    d = instantiate_from_config(cfg)
    assert isinstance(d, den.DiscreteDenoiser) and isinstance(d.scaling, scaling.EpsScaling)
    sampler = instantiate_from_config({
        "target": "sgm.modules.diffusionmodules.sampling.EulerEDMSampler",
        "params": {"num_steps": 7, "discretization_config": {"target": "EDMDiscretization"},
                   "guider_config": {"target": "VanillaCFG", "params": {"scale": 3.0}}},
    })
    assert sampler.num_steps == 7 and sampler.guider.scale == 3.0
    with pytest.raises(ValueError, match="unknown target 'sgm.Nope'"):
        instantiate_from_config({"target": "sgm.Nope"})
