"""Guiders: how the conditional and unconditional predictions are combined, as the seed.

`prepare_inputs(x, sigma, cond, uc)` builds the network batch; `guider(denoised, sigma)`
combines its outputs. VanillaCFG doubles the batch ([uc; c]) exactly as the seed does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax.numpy as jnp

from .denoiser import append_dims

Cond = Mapping[str, Any]
BATCHED_COND_KEYS = ("vector", "crossattn", "concat")


@dataclass(frozen=True)
class IdentityGuider:
    needs_uc = False

    def prepare_inputs(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: Cond, uc: Cond | None):
        return x, sigma, dict(cond)

    def __call__(self, denoised: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        return denoised


@dataclass(frozen=True)
class NoDynamicThresholding:
    def __call__(self, uncond: jnp.ndarray, cond: jnp.ndarray, scale: float) -> jnp.ndarray:
        return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class DynamicThresholding:
    """Imagen-style dynamic thresholding of the guided x0 prediction.

    Per example, s = max(quantile(|x0|, percentile), 1); x0 is clipped to [-s, s] and divided
    by s, which keeps high CFG scales from saturating (pixel-space models).
    """

    percentile: float = 0.995

    def __call__(self, uncond: jnp.ndarray, cond: jnp.ndarray, scale: float) -> jnp.ndarray:
        x0 = uncond + scale * (cond - uncond)
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, self.percentile, axis=1), 1.0)
        s = append_dims(s, x0.ndim)
        return jnp.clip(x0, -s, s) / s


@dataclass(frozen=True)
class VanillaCFG:
    """Classifier-free guidance: D = D_u + scale * (D_c - D_u)."""

    scale: float
    dyn_thresh: Any = NoDynamicThresholding()
    needs_uc = True

    def prepare_inputs(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: Cond, uc: Cond | None):
        if uc is None:
            raise ValueError("VanillaCFG needs an unconditional conditioning: pass uc=... to the sampler")
        merged = {}
        for k, v in cond.items():
            if k in BATCHED_COND_KEYS:
                if k not in uc:
                    raise ValueError(f"uc lacks the conditioning key {k!r} that cond has")
                merged[k] = jnp.concatenate([uc[k], v], axis=0)
            else:
                merged[k] = v  # the seed asserts these are equal in cond and uc
        return jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), merged

    def __call__(self, denoised: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        x_u, x_c = jnp.split(denoised, 2, axis=0)
        return self.dyn_thresh(x_u, x_c, self.scale)
