"""StandardDiffusionLoss as a pure function, as the seed's diffusionmodules/loss.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from .denoiser import append_dims

# denoise_fn(params, noised_x [B,H,W,C], sigmas [B], cond) -> denoised [B,H,W,C]
DenoiseFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Mapping[str, Any]], jnp.ndarray]
LOSS_TYPES = ("l2", "l1")


@dataclass(frozen=True)
class StandardDiffusionLoss:
    sigma_sampler: Any
    loss_weighting: Any
    loss_type: str = "l2"
    offset_noise_level: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")

    def __call__(self, denoise_fn: DenoiseFn, params: Any, x: jnp.ndarray, cond: Mapping[str, Any],
                 key: jax.Array) -> jnp.ndarray:
        """x: [B, H, W, C] clean data -> per-example loss [B] (float32)."""
        sigma_key, noise_key, offset_key = jax.random.split(key, 3)
        sigmas = self.sigma_sampler(sigma_key, x.shape[0]).astype(x.dtype)
        noise = jax.random.normal(noise_key, x.shape, x.dtype)
        if self.offset_noise_level > 0.0:
            # one offset per example and channel (NHWC: broadcast over H, W)
            offset = jax.random.normal(offset_key, (x.shape[0], 1, 1, x.shape[-1]), x.dtype)
            noise = noise + self.offset_noise_level * offset
        noised = x + noise * append_dims(sigmas, x.ndim)
        denoised = denoise_fn(params, noised, sigmas, cond).astype(jnp.float32)
        w = append_dims(self.loss_weighting(sigmas), x.ndim).astype(jnp.float32)
        err = denoised - x.astype(jnp.float32)
        per_elem = w * (err**2 if self.loss_type == "l2" else jnp.abs(err))
        return jnp.mean(per_elem.reshape(x.shape[0], -1), axis=1)
