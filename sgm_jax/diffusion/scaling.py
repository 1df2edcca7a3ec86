"""Denoiser preconditioning: sigma -> (c_skip, c_out, c_in, c_noise), as the seed's denoiser_scaling.

D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise). Every scaling is a frozen dataclass
whose call is a pure jax.numpy function of `sigma` (any shape, broadcast elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

Scalings = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]


@dataclass(frozen=True)
class EDMScaling:
    """Karras et al. (2022) preconditioning; c_noise = log(sigma) / 4."""

    sigma_data: float = 0.5

    def __call__(self, sigma: jnp.ndarray) -> Scalings:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        c_noise = 0.25 * jnp.log(sigma)
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class EpsScaling:
    """Epsilon prediction (DDPM / SD 1.x, 2.x-512); c_noise = sigma (quantised to t by DiscreteDenoiser)."""

    def __call__(self, sigma: jnp.ndarray) -> Scalings:
        c_skip = jnp.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class VScaling:
    """v prediction (SD 2.x-768, SDXL refiner is eps); c_noise = sigma."""

    def __call__(self, sigma: jnp.ndarray) -> Scalings:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class VScalingWithEDMcNoise:
    """v prediction with the EDM noise conditioning c_noise = log(sigma) / 4."""

    def __call__(self, sigma: jnp.ndarray) -> Scalings:
        c_skip, c_out, c_in, _ = VScaling()(sigma)
        return c_skip, c_out, c_in, 0.25 * jnp.log(sigma)
