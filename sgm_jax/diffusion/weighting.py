"""Loss weightings lambda(sigma), as the seed's denoiser_weighting / loss_weighting."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class UnitWeighting:
    def __call__(self, sigma: jnp.ndarray) -> jnp.ndarray:
        return jnp.ones_like(sigma)


@dataclass(frozen=True)
class EDMWeighting:
    """(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: the inverse of c_out^2."""

    sigma_data: float = 0.5

    def __call__(self, sigma: jnp.ndarray) -> jnp.ndarray:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@dataclass(frozen=True)
class VWeighting(EDMWeighting):
    """EDMWeighting with sigma_data = 1 (the seed takes no argument)."""

    sigma_data: float = 1.0


@dataclass(frozen=True)
class EpsWeighting:
    def __call__(self, sigma: jnp.ndarray) -> jnp.ndarray:
        return sigma**-2.0
