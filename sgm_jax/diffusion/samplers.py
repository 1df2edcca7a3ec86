"""The seed's six samplers and turbo.py's SubstepSampler as pure functions with one compiled
step loop each.

Every per-step scalar (sigmas, churn, ancestral sigma_up/sigma_down, DPM-Solver multipliers,
LMS coefficients) depends only on the schedule, so it is computed once on the host in
float64 and fed to a single `lax.scan`; the loop body holds only array work and denoiser
calls. Steps where the seed skips a network evaluation (Heun / DPM++2S at sigma = 0) use
`lax.cond`, so the skipped evaluation is not run.

Call: `sampler(denoiser, x, cond, uc=None, key=None)` with `denoiser(x, sigma, cond) ->
denoised`, `x: [B, H, W, C]` unit-variance noise (scaled here by sqrt(1 + sigma_0^2) as the
seed does), `sigma: [B]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .discretization import Discretization, EDMDiscretization, LegacyDDPMDiscretization, _check_num_steps
from .guiders import IdentityGuider

DenoiserFn = Callable[[jnp.ndarray, jnp.ndarray, Mapping[str, Any]], jnp.ndarray]
Tables = dict[str, np.ndarray]


def get_ancestral_step(sigma_from: np.ndarray, sigma_to: np.ndarray, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step, as k-diffusion / the seed."""
    if not eta:
        return sigma_to, np.zeros_like(sigma_to)
    sigma_up = np.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial on t_i..t_{i-order+1}.

    The seed integrates with scipy's quad; the integrand is a polynomial of degree < 4, which
    quad integrates exactly, so exact polynomial integration gives the same numbers.
    """
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


@dataclass(frozen=True)
class BaseDiffusionSampler:
    num_steps: int | None = None
    discretization: Discretization = EDMDiscretization()
    guider: Any = IdentityGuider()

    # True where the sampler never uses uc (turbo.py's SubstepSampler): CFG would only double the batch
    guidance_free: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.num_steps is not None:
            _check_num_steps(self.num_steps)

    @classmethod
    def with_steps(cls, steps: int, **kwargs: Any) -> "BaseDiffusionSampler":
        """The sampler that takes `steps` steps (what --steps sets); kwargs: the other fields."""
        return cls(num_steps=steps, **kwargs)

    # --- what each sampler defines -------------------------------------------------------
    def tables(self, sigmas: np.ndarray) -> Tables:
        """Per-step host constants, each [num_sigmas - 1, ...]."""
        return {"sigma": sigmas[:-1], "next_sigma": sigmas[1:]}

    def uses_noise(self, tables: Tables) -> bool:
        return False

    def init_carry(self, x: jnp.ndarray) -> Any:
        return ()

    def step(self, denoise: Callable, x: jnp.ndarray, carry: Any, t: Mapping[str, jnp.ndarray], key: jax.Array):
        raise NotImplementedError  # abstract: each sampler's update rule

    # --- the shared loop -----------------------------------------------------------------
    def sigmas(self, num_steps: int | None = None) -> np.ndarray:
        n = self.num_steps if num_steps is None else num_steps
        if n is None:
            raise ValueError(f"{type(self).__name__}: num_steps is not set")
        return np.asarray(self.discretization(_check_num_steps(n)), dtype=np.float32)

    def __call__(self, denoiser: DenoiserFn, x: jnp.ndarray, cond: Mapping[str, Any],
                 uc: Mapping[str, Any] | None = None, key: jax.Array | None = None,
                 num_steps: int | None = None, progress: Callable[[Any], None] | None = None) -> jnp.ndarray:
        """x: [B, ...] unit-variance noise -> samples [B, ...]."""
        sigmas = self.sigmas(num_steps)
        if getattr(self.guider, "needs_uc", False) and uc is None:
            raise ValueError(f"{type(self.guider).__name__} needs an unconditional conditioning: pass uc=...")
        host_tables = self.tables(sigmas.astype(np.float64))
        stochastic = self.uses_noise(host_tables)
        if stochastic and key is None:
            raise ValueError(f"{type(self).__name__} draws noise: pass key=jax.random.key(seed)")
        num_loop = len(sigmas) - 1
        tables = {k: jnp.asarray(v, dtype=x.dtype) for k, v in host_tables.items()}
        step_keys = jax.random.split(key, num_loop) if stochastic else None  # None: an empty pytree

        batch = x.shape[0]

        def denoise(x_: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
            s = jnp.full((batch,), sigma, dtype=x_.dtype)
            xi, si, ci = self.guider.prepare_inputs(x_, s, cond, uc)
            return self.guider(denoiser(xi, si, ci), s)

        def body(state, inputs):
            x_, carry = state
            index, t, step_key = inputs
            if progress is not None:
                jax.debug.callback(progress, index)
            return self.step(denoise, x_, carry, t, step_key), None

        # the seed multiplies by sqrt(1 + sigma_0^2) computed in float32
        x = x * jnp.asarray(np.sqrt(np.float32(1.0) + sigmas[0] ** 2), x.dtype)
        (x, _), _ = jax.lax.scan(body, (x, self.init_carry(x)), (jnp.arange(num_loop), tables, step_keys))
        return x


def _to_d(x: jnp.ndarray, sigma: jnp.ndarray, denoised: jnp.ndarray) -> jnp.ndarray:
    return (x - denoised) / sigma


@dataclass(frozen=True)
class EDMSampler(BaseDiffusionSampler):
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def tables(self, sigmas: np.ndarray) -> Tables:
        sigma, next_sigma = sigmas[:-1], sigmas[1:]
        in_range = (self.s_tmin <= sigma) & (sigma <= self.s_tmax)
        gamma = np.where(in_range, min(self.s_churn / (len(sigmas) - 1), 2**0.5 - 1), 0.0)
        sigma_hat = sigma * (gamma + 1.0)
        return {
            "sigma_hat": sigma_hat,
            "next_sigma": next_sigma,
            "dt": next_sigma - sigma_hat,
            "churn_std": self.s_noise * np.sqrt(sigma_hat**2 - sigma**2),
        }

    def uses_noise(self, tables: Tables) -> bool:
        return bool(np.any(tables["churn_std"] > 0))

    def step(self, denoise, x, carry, t, key):
        if key is not None:
            x = x + jax.random.normal(key, x.shape, x.dtype) * t["churn_std"]
        d = _to_d(x, t["sigma_hat"], denoise(x, t["sigma_hat"]))
        euler = x + t["dt"] * d
        return self.correct(denoise, x, d, euler, t), carry

    def correct(self, denoise, x, d, euler, t):
        return euler


@dataclass(frozen=True)
class EulerEDMSampler(EDMSampler):
    pass


@dataclass(frozen=True)
class HeunEDMSampler(EDMSampler):
    def correct(self, denoise, x, d, euler, t):
        def heun() -> jnp.ndarray:
            d_new = _to_d(euler, t["next_sigma"], denoise(euler, t["next_sigma"]))
            return x + (d + d_new) / 2.0 * t["dt"]

        # at sigma = 0 the seed skips the correction and its network evaluation
        return jax.lax.cond(t["next_sigma"] > 0, heun, lambda: euler)


@dataclass(frozen=True)
class AncestralSampler(BaseDiffusionSampler):
    eta: float = 1.0
    s_noise: float = 1.0

    def tables(self, sigmas: np.ndarray) -> Tables:
        sigma, next_sigma = sigmas[:-1], sigmas[1:]
        sigma_down, sigma_up = get_ancestral_step(sigma, next_sigma, self.eta)
        return {"sigma": sigma, "next_sigma": next_sigma, "sigma_down": sigma_down,
                "noise_std": np.where(next_sigma > 0, self.s_noise * sigma_up, 0.0)}

    def uses_noise(self, tables: Tables) -> bool:
        return bool(np.any(tables["noise_std"] > 0))

    def ancestral_noise(self, x: jnp.ndarray, t, key) -> jnp.ndarray:
        if key is None:  # eta = 0: deterministic
            return x
        return x + jax.random.normal(key, x.shape, x.dtype) * t["noise_std"]


@dataclass(frozen=True)
class EulerAncestralSampler(AncestralSampler):
    def step(self, denoise, x, carry, t, key):
        d = _to_d(x, t["sigma"], denoise(x, t["sigma"]))
        x = x + (t["sigma_down"] - t["sigma"]) * d
        return self.ancestral_noise(x, t, key), carry


# turbo.py's steps_subset: schedule indices where steps 1..4 start, then where the last one ends
# (1000 of the 1000-step schedule + its appended zero: sigma 0)
TURBO_STEPS_SUBSET = (0, 100, 200, 300, 1000)


@dataclass(frozen=True)
class SubstepSampler(EulerAncestralSampler):
    """SDXL-Turbo / SD-Turbo's sampler (the seed's scripts/demo/turbo.py): Euler ancestral over a
    few sigmas picked from the whole `num_steps`-step schedule, with uc = cond (no guidance).

    The schedule is discretization(num_steps) (1000 LegacyDDPM sigmas, descending, and the
    appended 0); `n_sample_steps` (1 to len(steps_subset) - 1) steps visit its indices
    steps_subset[:n_sample_steps] and end at steps_subset[-1]. With the LegacyDDPM schedule
    (timesteps 999, 899, 799, 699): 1 step [14.6146, 0], 2 steps [14.6146, 8.3028, 0],
    4 steps [14.6146, 8.3028, 5.0878, 3.3211, 0]. One step draws no noise (sigma_up = 0 at
    sigma 0): it returns D(x * sqrt(1 + sigma_0^2), sigma_0).
    """

    num_steps: int | None = 1000  # the length of the schedule the substeps index, as turbo.py sets it
    discretization: Discretization = LegacyDDPMDiscretization()
    n_sample_steps: int = 1
    steps_subset: tuple[int, ...] = TURBO_STEPS_SUBSET
    guidance_free: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "steps_subset", tuple(int(i) for i in self.steps_subset))  # a yaml list, hashable
        n, most = self.n_sample_steps, len(self.steps_subset) - 1
        if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= most:
            raise ValueError(f"SubstepSampler takes 1 to {most} steps (substeps {list(self.steps_subset[:-1])} "
                             f"of the {self.num_steps}-step schedule), got {n!r}")

    @classmethod
    def with_steps(cls, steps: int, **kwargs: Any) -> "SubstepSampler":
        return cls(n_sample_steps=steps, **kwargs)

    def sigmas(self, num_steps: int | None = None) -> np.ndarray:
        full = super().sigmas(num_steps)
        picked = list(self.steps_subset[: int(self.n_sample_steps)]) + [self.steps_subset[-1]]
        if picked[-1] >= len(full):  # an img2img / refiner wrapper shortened the schedule
            raise ValueError(f"SubstepSampler picks indices {picked} of the whole schedule, which has "
                             f"{len(full)} sigmas here: img2img and refiner hand-offs are not supported")
        return full[picked]

    def __call__(self, denoiser: DenoiserFn, x: jnp.ndarray, cond: Mapping[str, Any],
                 uc: Mapping[str, Any] | None = None, key: jax.Array | None = None,
                 num_steps: int | None = None, progress: Callable[[Any], None] | None = None) -> jnp.ndarray:
        # the seed's SubstepSampler overwrites uc with cond: a CFG guider changes nothing
        return super().__call__(denoiser, x, cond, uc=cond, key=key, num_steps=num_steps, progress=progress)


@dataclass(frozen=True)
class DPMPP2SAncestralSampler(AncestralSampler):
    def tables(self, sigmas: np.ndarray) -> Tables:
        tables = super().tables(sigmas)
        sigma, sigma_down = tables["sigma"], tables["sigma_down"]
        with np.errstate(divide="ignore", invalid="ignore"):
            t, t_next = -np.log(sigma), -np.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            mults = {
                "sigma_mid": np.exp(-s),
                "m1": np.exp(-s) / np.exp(-t),
                "m2": np.expm1(-0.5 * h),
                "m3": np.exp(-t_next) / np.exp(-t),
                "m4": np.expm1(-h),
            }
        # unused where sigma_down = 0 (that step is plain Euler); keep the tables finite
        return tables | {k: np.where(sigma_down > 0, v, 0.0) for k, v in mults.items()}

    def step(self, denoise, x, carry, t, key):
        denoised = denoise(x, t["sigma"])
        x_euler = x + (t["sigma_down"] - t["sigma"]) * _to_d(x, t["sigma"], denoised)

        def dpm_solver_2s() -> jnp.ndarray:
            x2 = t["m1"] * x - t["m2"] * denoised
            return t["m3"] * x - t["m4"] * denoise(x2, t["sigma_mid"])

        x = jax.lax.cond(t["sigma_down"] > 0, dpm_solver_2s, lambda: x_euler)
        return self.ancestral_noise(x, t, key), carry


@dataclass(frozen=True)
class DPMPP2MSampler(BaseDiffusionSampler):
    def tables(self, sigmas: np.ndarray) -> Tables:
        sigma, next_sigma = sigmas[:-1], sigmas[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            t, t_next = -np.log(sigma), -np.log(next_sigma)
            h = t_next - t
            m1 = np.exp(-t_next) / np.exp(-t)
            m2 = np.expm1(-h)
            h_last = np.concatenate([[np.nan], t[1:] - t[:-1]])
            r = h_last / h
            m3, m4 = 1 + 1 / (2 * r), 1 / (2 * r)
        # the first step has no previous prediction, the last (sigma = 0) takes the plain
        # update: there the combination reduces to 1 * denoised - 0 * old
        advanced = (np.arange(len(sigma)) > 0) & (next_sigma > 0)
        return {"sigma": sigma, "m1": m1, "m2": m2,
                "m3": np.where(advanced, m3, 1.0), "m4": np.where(advanced, m4, 0.0)}

    def init_carry(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(x)

    def step(self, denoise, x, old_denoised, t, key):
        denoised = denoise(x, t["sigma"])
        x = t["m1"] * x - t["m2"] * (t["m3"] * denoised - t["m4"] * old_denoised)
        return x, denoised


@dataclass(frozen=True)
class LinearMultistepSampler(BaseDiffusionSampler):
    order: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.order) < 1:
            raise ValueError(f"LinearMultistepSampler order must be >= 1, got {self.order}")

    def tables(self, sigmas: np.ndarray) -> Tables:
        num_loop = len(sigmas) - 1
        coeffs = np.zeros((num_loop, self.order))
        for i in range(num_loop):
            cur_order = min(i + 1, self.order)
            coeffs[i, :cur_order] = [linear_multistep_coeff(cur_order, sigmas, i, j) for j in range(cur_order)]
        return {"sigma": sigmas[:-1], "coeffs": coeffs}

    def init_carry(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros((self.order,) + x.shape, x.dtype)  # derivatives, newest first

    def step(self, denoise, x, ds, t, key):
        d = _to_d(x, t["sigma"], denoise(x, t["sigma"]))
        ds = jnp.concatenate([d[None], ds[:-1]], axis=0)
        update = t["coeffs"][0] * ds[0]
        for j in range(1, self.order):
            update = update + t["coeffs"][j] * ds[j]
        return x + update, ds


SAMPLERS: dict[str, type[BaseDiffusionSampler]] = {
    "euler_edm": EulerEDMSampler,
    "heun_edm": HeunEDMSampler,
    "euler_ancestral": EulerAncestralSampler,
    "dpmpp2s_ancestral": DPMPP2SAncestralSampler,
    "dpmpp2m": DPMPP2MSampler,
    "linear_multistep": LinearMultistepSampler,
    "substep_euler_ancestral": SubstepSampler,
}
SAMPLERS.update({cls.__name__: cls for cls in list(SAMPLERS.values())})


def canonical_sampler_name(name: str) -> str:
    """CLI name from a CLI name or a seed class name (EulerEDMSampler -> euler_edm)."""
    for short, cls in SAMPLERS.items():
        if short.islower() and name in (short, cls.__name__):
            return short
    choices = ", ".join(k for k in SAMPLERS if k.islower())
    raise ValueError(f"unknown sampler {name!r}; choose one of: {choices}")


def get_sampler(name: str, **kwargs: Any) -> BaseDiffusionSampler:
    """Sampler by CLI name (euler_edm, heun_edm, ...) or seed class name; kwargs: its fields."""
    if name not in SAMPLERS:
        choices = ", ".join(k for k in SAMPLERS if k.islower())
        raise ValueError(f"unknown sampler {name!r}; choose one of: {choices}")
    return SAMPLERS[name](**kwargs)
