"""Denoisers: wrap a network F into D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), as the seed.

A network function here has the signature `network(x_in, c_noise, cond) -> output`, with
`x_in: [B, H, W, C]`, `c_noise: [B]`; `DiffusionEngine.network_fn` (sgm_jax/engine.py) builds one from
a UNet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from .discretization import Discretization

NetworkFn = Callable[[jnp.ndarray, jnp.ndarray, Mapping[str, Any]], jnp.ndarray]


def append_dims(x: jnp.ndarray, target_ndim: int) -> jnp.ndarray:
    """[B] -> [B, 1, ..., 1] with `target_ndim` dims in all."""
    return x.reshape(x.shape + (1,) * (target_ndim - x.ndim))


@dataclass(frozen=True)
class Denoiser:
    scaling: Any  # one of sgm_jax.diffusion.scaling

    def possibly_quantize_sigma(self, sigma: jnp.ndarray) -> jnp.ndarray:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: jnp.ndarray) -> jnp.ndarray:
        return c_noise

    def __call__(self, network: NetworkFn, x: jnp.ndarray, sigma: jnp.ndarray, cond: Mapping[str, Any]) -> jnp.ndarray:
        """x: [B, H, W, C], sigma: [B] -> denoised x: [B, H, W, C]."""
        sigma = self.possibly_quantize_sigma(sigma)
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, x.ndim))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape))
        return network(x * c_in, c_noise, cond) * c_out + x * c_skip


@dataclass(frozen=True)
class DiscreteDenoiser(Denoiser):
    """Snaps sigma to the nearest of `num_idx` trained levels and feeds the network its index."""

    num_idx: int = 1000
    discretization: Discretization | None = None
    do_append_zero: bool = False
    quantize_c_noise: bool = True
    flip: bool = True
    sigmas: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.discretization is None:
            raise ValueError("DiscreteDenoiser needs a discretization (e.g. LegacyDDPMDiscretization())")
        table = self.discretization(self.num_idx, do_append_zero=self.do_append_zero, flip=self.flip)
        object.__setattr__(self, "sigmas", table)

    def __hash__(self) -> int:
        return hash((type(self), self.scaling, self.num_idx, self.discretization, self.do_append_zero,
                     self.quantize_c_noise, self.flip))

    def sigma_to_idx(self, sigma: jnp.ndarray) -> jnp.ndarray:
        table = jnp.asarray(self.sigmas, dtype=sigma.dtype)
        return jnp.argmin(jnp.abs(sigma[None] - table.reshape((-1,) + (1,) * sigma.ndim)), axis=0)

    def idx_to_sigma(self, idx: jnp.ndarray) -> jnp.ndarray:
        return jnp.asarray(self.sigmas)[idx]

    def possibly_quantize_sigma(self, sigma: jnp.ndarray) -> jnp.ndarray:
        return self.idx_to_sigma(self.sigma_to_idx(sigma)).astype(sigma.dtype)

    def possibly_quantize_c_noise(self, c_noise: jnp.ndarray) -> jnp.ndarray:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
