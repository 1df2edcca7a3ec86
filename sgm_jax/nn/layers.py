"""Small building blocks shared by the UNet, the VAE and the conditioner.

Everything here is NHWC / channels-last: the channel axis is always the last one.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import mesh_context

Dtype = Any


def timestep_embedding(
    timesteps: jax.Array, dim: int, max_period: float = 10000.0, repeat_only: bool = False
) -> jax.Array:
    """Sinusoidal timestep embeddings, as the seed's `timestep_embedding`.

    Args:
      timesteps: `[N]` (possibly fractional) timesteps.
      dim: embedding width.
      max_period: controls the lowest frequency.
      repeat_only: if True, just repeat the timestep `dim` times (seed semantics).

    Returns:
      `[N, dim]` float32: `[cos(t * f_0..f_{half-1}), sin(...)]` (cos first, then sin), with
      one trailing zero column when `dim` is odd.
    """
    timesteps = jnp.asarray(timesteps)
    if repeat_only:
        # The seed keeps the input dtype here (einops.repeat).
        return jnp.broadcast_to(timesteps[:, None], (timesteps.shape[0], dim))
    half = dim // 2
    # Host constants: the seed's float32 exponent, then a correctly rounded exp. This agrees
    # with torch's float32 exp on all but 1 of 128 frequencies (XLA's own exp: 17 differ).
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = timesteps[:, None].astype(jnp.float32) * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis, statistics in float32.

    Matches the seed's `GroupNorm32` (eps 1e-5, computed in float32, cast back to the input
    dtype) and `Normalize` (eps 1e-6). Params: `scale` `[C]` (torch `weight`), `bias` `[C]`.

    Input `[B, ..., C]` -> output of the same shape and dtype (or `dtype` when given).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        out_dtype = self.dtype or x.dtype
        batch, per_group = x.shape[0], channels // self.num_groups
        # Reduce over positions with the channels innermost ([B, HW, C] -> [B, C]), then sum
        # the few channels of each group: a [B, HW, G, C/G] view would put a 1-4 wide axis
        # innermost, which XLA:CPU vectorises badly. Two-pass variance, like torch.
        xf = x.astype(jnp.float32).reshape(batch, -1, channels)
        count = xf.shape[1] * per_group

        def group_mean(channel_sums: jax.Array) -> jax.Array:  # [B, C] -> [B, 1, C]
            sums = channel_sums.reshape(batch, self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(sums, per_group, axis=-1)[:, None, :]

        centred = xf - group_mean(xf.sum(axis=1))
        inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(axis=1)) + self.epsilon)
        out = (centred * inv_std).reshape(x.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(out_dtype)


def zeros_init() -> nn.initializers.Initializer:
    """Initializer for the seed's `zero_module` layers (output projections start at 0)."""
    return nn.initializers.zeros_init()


# jax.checkpoint_policies by name: what a rematerialised block keeps from its forward pass
# (None: nothing but its inputs, the seed's use_checkpoint).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@functools.cache
def remat(module: type[nn.Module], policy: str | None = None, static_argnums: tuple[int, ...] = ()) -> type:
    """`nn.remat(module)` with a jax.checkpoint_policies policy named by `policy` (REMAT_POLICIES)."""
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy!r} is not one of {', '.join(REMAT_POLICIES)}")
    named = None if policy is None else getattr(jax.checkpoint_policies, policy)
    return nn.remat(module, policy=named, static_argnums=static_argnums)


def in_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, size: int | None, loop: bool = True) -> jax.Array:
    """fn over x in chunks of `size` along the batch, joined again: the seed's
    en_and_decode_n_samples_a_time loop (the last chunk may be shorter; None: one call). The equal
    chunks run one after another in a lax.map, so only one chunk's temporaries are live (unrolled
    calls let XLA overlap them: SDXL's 1024² decode of 4 images held 17.5 GiB on one TPU chip that
    way, as much as one batched call). The chunks are the seed's rows [i*size, (i+1)*size).
    loop=False: unrolled calls, for an fn that calls a bound Flax submodule (lax.map cannot trace it); so
    too for a batch traced as split over several devices (mesh_context)."""
    rows = x.shape[0]
    if not size or size >= rows:
        return fn(x)
    if not loop or mesh_context.traced_batch_split(rows) != ():
        # a batch split over several devices: a loop over its rows would leave most of them idle
        return jnp.concatenate([fn(x[i:i + size]) for i in range(0, rows, size)])
    whole = rows // size * size
    looped = jax.lax.map(fn, x[:whole].reshape((rows // size, size) + x.shape[1:]))
    out = looped.reshape((whole,) + looped.shape[2:])
    return out if whole == rows else jnp.concatenate([out, fn(x[whole:])])
