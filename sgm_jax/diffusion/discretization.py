"""Noise-level schedules, as the seed's discretizer.py.

A discretization is host-side: `disc(n, do_append_zero=True, flip=False)` returns a numpy
float32 array of sigmas (descending unless flipped) that samplers bake into their compiled
loop as constants. float32 arithmetic follows the seed's torch code so values agree to
the last few ulps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _check_num_steps(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    return int(n)


class Discretization:
    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        sigmas = self.get_sigmas(_check_num_steps(n)).astype(np.float32)
        if do_append_zero:
            sigmas = np.append(sigmas, np.float32(0.0))
        return sigmas[::-1].copy() if flip else sigmas

    def get_sigmas(self, n: int) -> np.ndarray:
        raise NotImplementedError  # abstract: every concrete discretization defines its schedule


@dataclass(frozen=True)
class EDMDiscretization(Discretization):
    """Karras rho-schedule from sigma_max down to sigma_min (n values)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def get_sigmas(self, n: int) -> np.ndarray:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        min_inv_rho = np.float32(self.sigma_min ** (1 / self.rho))
        max_inv_rho = np.float32(self.sigma_max ** (1 / self.rho))
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** np.float32(self.rho)


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


@dataclass(frozen=True)
class LegacyDDPMDiscretization(Discretization):
    """SD 1.x/2.x/SDXL's scaled-linear beta schedule expressed as sigmas = sqrt((1 - a) / a)."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = np.linspace(self.linear_start**0.5, self.linear_end**0.5, self.num_timesteps, dtype=np.float64) ** 2
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas, axis=0))

    def __hash__(self) -> int:
        return hash((type(self), self.linear_start, self.linear_end, self.num_timesteps))

    def get_sigmas(self, n: int) -> np.ndarray:
        if n < self.num_timesteps:
            alphas_cumprod = self.alphas_cumprod[generate_roughly_equally_spaced_steps(n, self.num_timesteps)]
        elif n == self.num_timesteps:
            alphas_cumprod = self.alphas_cumprod
        else:
            raise ValueError(f"LegacyDDPMDiscretization has {self.num_timesteps} timesteps; asked for {n}")
        # the seed casts to float32 before the square root
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32) ** np.float32(0.5)
        return sigmas[::-1]


@dataclass(frozen=True)
class Img2ImgDiscretizationWrapper(Discretization):
    """Keeps the lowest `strength` fraction of the schedule: img2img starts part-way down."""

    discretization: Discretization
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"img2img strength must be in [0, 1], got {self.strength}")

    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        sigmas = self.discretization(n, do_append_zero=do_append_zero, flip=flip)[::-1]
        sigmas = sigmas[: max(int(self.strength * len(sigmas)), 1)]
        return sigmas[::-1].copy()


@dataclass(frozen=True)
class Txt2NoisyDiscretizationWrapper(Discretization):
    """Stops the schedule early, leaving `1 - strength` of it (the SDXL base -> refiner hand-off)."""

    discretization: Discretization
    strength: float = 0.0
    original_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")

    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        sigmas = self.discretization(n, do_append_zero=do_append_zero, flip=flip)
        steps = len(sigmas) if self.original_steps is None else self.original_steps + 1
        prune = max(min(int(self.strength * steps) - 1, steps - 1), 0)
        # drops the `prune` smallest sigmas: the base model stops early for the refiner
        return sigmas[: len(sigmas) - prune].copy()
