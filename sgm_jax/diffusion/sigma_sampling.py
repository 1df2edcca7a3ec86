"""Training-time noise-level samplers, as the seed's sigma_sampling.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .discretization import Discretization


@dataclass(frozen=True)
class EDMSampling:
    """log(sigma) ~ N(p_mean, p_std^2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, key: jax.Array, n_samples: int) -> jnp.ndarray:
        """Returns sigmas: [n_samples] float32."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (n_samples,)))


@dataclass(frozen=True)
class DiscreteSampling:
    """sigma drawn uniformly from the `num_idx` levels of a discretization (DDPM training)."""

    discretization: Discretization
    num_idx: int
    do_append_zero: bool = False
    flip: bool = True
    sigmas: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = self.discretization(self.num_idx, do_append_zero=self.do_append_zero, flip=self.flip)
        object.__setattr__(self, "sigmas", table)

    def __hash__(self) -> int:
        return hash((type(self), self.discretization, self.num_idx, self.do_append_zero, self.flip))

    def idx_to_sigma(self, idx: jnp.ndarray) -> jnp.ndarray:
        return jnp.asarray(self.sigmas)[idx]

    def __call__(self, key: jax.Array, n_samples: int) -> jnp.ndarray:
        return self.idx_to_sigma(jax.random.randint(key, (n_samples,), 0, self.num_idx))
