"""The six samplers and turbo.py's SubstepSampler: seed trajectories, the exact Gaussian denoiser, purity,
compilation, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from conftest import fixture_path
from sgm_jax.diffusion import discretization as disc
from sgm_jax.diffusion import guiders
from sgm_jax.diffusion import samplers as smp



def gaussian_denoiser(s: float):
    """The exact denoiser for data ~ N(mu, s^2) with mu = cond["vector"] per channel."""

    def denoise(x, sigma, cond):
        mu = cond["vector"][:, None, None, :] if "vector" in cond else 0.0
        return mu + (x - mu) * s**2 / (s**2 + sigma[:, None, None, None] ** 2)

    return denoise


def _fixture_cases():
    try:
        index = json.loads(fixture_path("samplers", "index.json").read_text())
    except pytest.skip.Exception:
        return ["missing"]
    return index["cases"]


@pytest.mark.parametrize("case", _fixture_cases())
def test_matches_seed_trajectory_end_points(case):
    path = fixture_path("samplers", f"{case}.npz")
    ref = np.load(path)
    name, discretization, guider, _ = case.split(".")
    sampler = getattr(smp, name)(
        num_steps=int(ref["num_steps"]),
        discretization=disc.EDMDiscretization() if discretization == "edm" else disc.LegacyDDPMDiscretization(),
        guider=guiders.IdentityGuider() if guider == "identity" else guiders.VanillaCFG(scale=3.0),
    )
    with enable_x64():  # the fixtures were computed in float64
        noise = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1))
        out = sampler(gaussian_denoiser(float(ref["data_std"])), noise, {"vector": jnp.asarray(ref["cond_vector"])},
                      uc={"vector": jnp.asarray(ref["uc_vector"])})
        assert out.dtype == jnp.float64
        want = ref["output"].transpose(0, 2, 3, 1)
        rel = np.abs(np.asarray(out) - want).max() / np.abs(want).max()
    assert rel < 1e-5, f"{case}: relative error {rel:.2e}"


def _sample_std(sampler, s=0.5, n=2048, key=None):
    noise = jax.random.normal(jax.random.key(0), (n, 8, 8, 1))
    out = jax.jit(lambda x, k: sampler(gaussian_denoiser(s), x, {}, key=k))(noise, key)
    return float(jnp.std(out))


# Euler is first order: its std error on this problem is 4.4% at 64 steps (exact recursion
# sum), 1.4% at 160; the second-order and multistep samplers are well inside 2% at 64
@pytest.mark.parametrize("cls,steps", [(smp.EulerEDMSampler, 160), (smp.HeunEDMSampler, 64),
                                       (smp.DPMPP2MSampler, 64), (smp.LinearMultistepSampler, 64)])
def test_deterministic_samplers_reach_the_data_std(cls, steps):
    s = 0.5
    std = _sample_std(cls(num_steps=steps), s)
    assert abs(std / s - 1) < 0.02, f"{cls.__name__}: std {std:.4f} vs {s}"


@pytest.mark.parametrize("cls,steps", [(smp.EulerAncestralSampler, 256), (smp.DPMPP2SAncestralSampler, 64)])
def test_ancestral_samplers_reach_the_data_std(cls, steps):
    s = 0.5
    std = _sample_std(cls(num_steps=steps), s, key=jax.random.key(1))
    assert abs(std / s - 1) < 0.03, f"{cls.__name__}: std {std:.4f} vs {s}"


def test_euler_ancestral_std_follows_its_exact_variance_recursion():
    # x' = a x + sigma_up z with a = 1 + (sigma_down - sigma) sigma / (s^2 + sigma^2) for the
    # exact Gaussian denoiser, so Var' = a^2 Var + sigma_up^2: the sampler must follow it
    s, n = 0.5, 64
    sig = disc.EDMDiscretization()(n).astype(np.float64)
    var = 1 + sig[0] ** 2
    for a, b in zip(sig[:-1], sig[1:]):
        down, up = smp.get_ancestral_step(a, b)
        var = var * (1 + (down - a) * a / (s**2 + a**2)) ** 2 + up**2
    std = _sample_std(smp.EulerAncestralSampler(num_steps=n), s, key=jax.random.key(2))
    assert abs(std / np.sqrt(var) - 1) < 0.01, (std, np.sqrt(var))


def test_heun_beats_euler_at_equal_steps():
    s = 0.5
    err = {cls: abs(_sample_std(cls(num_steps=32), s) / s - 1) for cls in (smp.EulerEDMSampler, smp.HeunEDMSampler)}
    assert err[smp.HeunEDMSampler] < err[smp.EulerEDMSampler] / 3, err


def test_churn_euler_std_follows_its_exact_variance_recursion():
    # churn raises sigma to sigma_hat by adding noise, then takes the Euler step from there
    s, n, churn, tmin, tmax = 0.5, 64, 20.0, 0.05, 50.0
    sig = disc.EDMDiscretization()(n).astype(np.float64)
    var = 1 + sig[0] ** 2
    for a, b in zip(sig[:-1], sig[1:]):
        gamma = min(churn / n, 2**0.5 - 1) if tmin <= a <= tmax else 0.0
        hat = a * (1 + gamma)
        var = (var + hat**2 - a**2) * (1 + (b - hat) * hat / (s**2 + hat**2)) ** 2
    sampler = smp.EulerEDMSampler(num_steps=n, s_churn=churn, s_tmin=tmin, s_tmax=tmax)
    std = _sample_std(sampler, s, key=jax.random.key(3))
    assert abs(std / np.sqrt(var) - 1) < 0.01, (std, np.sqrt(var))


STOCHASTIC = [smp.EulerAncestralSampler(num_steps=6), smp.DPMPP2SAncestralSampler(num_steps=6),
              smp.EulerEDMSampler(num_steps=6, s_churn=5.0)]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: type(s).__name__)
def test_same_key_same_output_different_key_different_output(sampler):
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    run = jax.jit(lambda x, k: sampler(gaussian_denoiser(0.5), x, {}, key=k))
    a, b, c = run(x, jax.random.key(7)), run(x, jax.random.key(7)), run(x, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


@pytest.mark.parametrize("cls,evals", [(smp.EulerEDMSampler, 1), (smp.HeunEDMSampler, 2), (smp.DPMPP2MSampler, 1),
                                       (smp.LinearMultistepSampler, 1), (smp.EulerAncestralSampler, 1),
                                       (smp.DPMPP2SAncestralSampler, 2)])
def test_whole_loop_compiles_once_with_the_denoiser_traced_per_evaluation_not_per_step(cls, evals):
    traces = []
    exact = gaussian_denoiser(0.5)

    def counting_denoiser(x, sigma, cond):
        traces.append(1)  # runs at trace time only
        return exact(x, sigma, cond)

    sampler = cls(num_steps=30)
    run = jax.jit(lambda x, k: sampler(counting_denoiser, x, {}, key=k))
    x = jnp.ones((2, 4, 4, 1))
    run(x, jax.random.key(0))
    run(x + 1.0, jax.random.key(1))
    assert len(traces) == evals  # a Python loop of 30 steps would trace 30+ times
    assert run._cache_size() == 1


def test_cfg_without_uc_is_one_clear_error_line():
    sampler = smp.EulerEDMSampler(num_steps=4, guider=guiders.VanillaCFG(scale=5.0))
    with pytest.raises(ValueError) as info:
        sampler(gaussian_denoiser(0.5), jnp.ones((1, 2, 2, 1)), {"vector": jnp.zeros((1, 1))})
    assert "uc=" in str(info.value) and "\n" not in str(info.value)


def test_bad_names_and_step_counts_are_one_clear_error_line():
    with pytest.raises(ValueError, match="unknown sampler 'euler_magic'; choose one of: euler_edm"):
        smp.get_sampler("euler_magic", num_steps=10)
    with pytest.raises(ValueError, match="number of steps must be an integer >= 1, got 0"):
        smp.EulerEDMSampler(num_steps=0)
    with pytest.raises(ValueError, match="number of steps"):
        smp.DPMPP2MSampler(num_steps=5)(gaussian_denoiser(0.5), jnp.ones((1, 2, 2, 1)), {}, num_steps=-1)
    with pytest.raises(ValueError, match="pass key="):
        smp.EulerAncestralSampler(num_steps=3)(gaussian_denoiser(0.5), jnp.ones((1, 2, 2, 1)), {})
    assert isinstance(smp.get_sampler("dpmpp2m", num_steps=3), smp.DPMPP2MSampler)


def test_lms_coefficients_equal_numerical_quadrature():
    sig = disc.EDMDiscretization()(10).astype(np.float64)
    for i, j, order in [(0, 0, 1), (3, 1, 4), (9, 3, 4), (5, 2, 3)]:
        tau = np.linspace(sig[i], sig[i + 1], 20001)
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
        numeric = np.trapezoid(basis, tau)
        assert abs(smp.linear_multistep_coeff(order, sig, i, j) - numeric) < 1e-6 * max(1.0, abs(numeric))


# ----------------------------------------------------------------------------- turbo.py's SubstepSampler


def seed_turbo_sigmas(n_sample_steps: int) -> np.ndarray:
    """turbo.py's schedule from the seed's formulas: LegacyDDPMDiscretization()(1000) (make_beta_schedule
    "linear": sqrt-linear betas in float64, (1 - a) / a cast to float32 before the root, flipped, 0
    appended), indexed by steps_subset[:n] + steps_subset[-1:] with steps_subset = [0, 100, 200, 300, 1000]."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    sigmas = np.append(np.sqrt(((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32))[::-1], np.float32(0))
    return sigmas[[0, 100, 200, 300][:n_sample_steps] + [1000]]


def turbo_sampler(n: int, **kw) -> smp.SubstepSampler:
    # turbo.py's own arguments: SubstepSampler(n_sample_steps=1, num_steps=1000, eta=1.0, LegacyDDPM)
    return smp.SubstepSampler(n_sample_steps=n, num_steps=1000, eta=1.0,
                              discretization=disc.LegacyDDPMDiscretization(), **kw)


def recording(denoiser, seen: list):
    """The denoiser, recording each evaluation's (batch, sigma) as it runs (inside jit and scan)."""

    def run(x, sigma, cond):
        jax.debug.callback(lambda s: seen.append((s.shape[0], float(s[0]))), sigma, ordered=True)
        return denoiser(x, sigma, cond)

    return run


MU = np.array([[0.1, -0.2, 0.3], [-0.4, 0.0, 0.2]], np.float32)  # per-example, per-channel data means


def test_substep_sigmas_are_the_seeds_substeps():
    for n, timesteps in ((1, [999]), (2, [999, 899]), (4, [999, 899, 799, 699])):
        want = seed_turbo_sigmas(n)
        np.testing.assert_allclose(turbo_sampler(n).sigmas(), want, rtol=1e-6, atol=0)
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        ac = np.cumprod(1 - betas)[timesteps]
        np.testing.assert_allclose(want[:-1], np.sqrt((1 - ac) / ac), rtol=1e-6)  # the DDPM timesteps they are
    np.testing.assert_allclose(seed_turbo_sigmas(4), [14.614641, 8.302803, 5.0877633, 3.321083, 0.0], rtol=1e-6)
    assert smp.SubstepSampler().sigmas().tolist() == turbo_sampler(1).sigmas().tolist()  # turbo.py's defaults
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="SubstepSampler takes 1 to 4 steps"):
            smp.SubstepSampler(n_sample_steps=bad)


def test_substep_one_step_is_the_denoised_noise_at_sigma_max():
    s, seen = 0.5, []
    s0 = float(seed_turbo_sigmas(1)[0])
    with enable_x64():  # float64 arithmetic: the update is checked exactly, not up to float32 cancellation
        noise = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.float64)
        cond = {"vector": jnp.asarray(MU, jnp.float64)}
        run = jax.jit(lambda x: turbo_sampler(1)(recording(gaussian_denoiser(s), seen), x, cond))  # no key: no noise
        out = np.asarray(run(noise))
    x = np.asarray(noise) * np.sqrt(1 + np.float32(s0) ** 2)  # the seed scales by sqrt(1 + sigma_0^2) in float32
    mu = MU[:, None, None, :].astype(np.float64)
    np.testing.assert_allclose(out, mu + (x - mu) * s**2 / (s**2 + s0**2), rtol=1e-10, atol=1e-12)
    assert seen == [(2, pytest.approx(s0, rel=1e-6))]  # one denoiser call, at sigma_max, on the batch as is


def test_substep_two_steps_follow_the_seeds_euler_ancestral_update():
    s, key, seen = 0.5, jax.random.key(3), []
    s0, s1, _ = seed_turbo_sigmas(2).astype(np.float64)
    # the seed's get_ancestral_step (eta = 1) from s0 to s1, then the last step to 0 (sigma_up = 0)
    up = min(s1, np.sqrt(s1**2 * (s0**2 - s1**2) / s0**2))
    down = np.sqrt(s1**2 - up**2)
    with enable_x64():
        noise = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.float64)
        cond = {"vector": jnp.asarray(MU, jnp.float64)}
        run = jax.jit(lambda x, k: turbo_sampler(2)(recording(gaussian_denoiser(s), seen), x, cond, key=k))
        out = np.asarray(run(noise, key))
        # the framework's noise contract: step i draws N(0, I) from jax.random.split(key, steps)[i]
        z = np.asarray(jax.random.normal(jax.random.split(key, 2)[0], noise.shape, jnp.float64))
    mu = MU[:, None, None, :].astype(np.float64)
    denoise = lambda x, sigma: mu + (x - mu) * s**2 / (s**2 + sigma**2)  # noqa: E731
    x0 = np.asarray(noise) * np.sqrt(1 + np.float32(s0) ** 2)
    x1 = x0 + (down - s0) * (x0 - denoise(x0, s0)) / s0 + up * z  # Euler to sigma_down, then the ancestral noise
    np.testing.assert_allclose(out, denoise(x1, s1), rtol=1e-10, atol=1e-12)  # Euler from s1 to 0: D(x1, s1)
    assert [sigma for _, sigma in seen] == pytest.approx([s0, s1], rel=1e-6)


def test_substep_is_compiled_once_deterministic_per_key_and_ignores_uc():
    traces, seen = [], []
    exact = gaussian_denoiser(0.5)

    def counting(x, sigma, cond):
        traces.append(1)  # at trace time only
        return exact(x, sigma, cond)

    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    cond, uc = {"vector": jnp.asarray(MU)}, {"vector": jnp.zeros((2, 3))}
    four = jax.jit(lambda x, k: turbo_sampler(4)(recording(counting, seen), x, cond, key=k))
    a, b, c = four(x, jax.random.key(7)), four(x, jax.random.key(7)), four(x, jax.random.key(8))
    assert len(traces) == 1 and four._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert [sigma for _, sigma in seen[:4]] == pytest.approx(seed_turbo_sigmas(4)[:-1].tolist(), rel=1e-6)
    # one step draws no noise: the key does not matter; and uc is the prompt's own (the seed sets uc = cond),
    # so CFG at any scale gives the unguided result
    one = turbo_sampler(1)(exact, x, cond)
    np.testing.assert_array_equal(np.asarray(turbo_sampler(1)(exact, x, cond, key=jax.random.key(1))), np.asarray(one))
    cfg = turbo_sampler(1, guider=guiders.VanillaCFG(scale=5.0))(exact, x, cond, uc=uc)
    np.testing.assert_allclose(np.asarray(cfg), np.asarray(one), rtol=1e-6, atol=1e-6)
