"""The seed's PatchGAN discriminator (NLayerDiscriminator, pix2pix) with its init, in Flax.

Mirrors `sgm/modules/autoencoding/lpips/model/model.py`: 4x4 convs with padding 1, stride 2
for the first `n_layers`, then two stride-1 convs; BatchNorm after every conv but the first
and the last (those have no bias, as BatchNorm supplies it); LeakyReLU(0.2). `weights_init`:
conv weights ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02) and bias 0; conv biases keep
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Inputs `[B, H, W, C]` -> logits `[B, H', W', 1]` (H' = H / 2^n_layers - 2, one logit per patch).
Module names follow the seed's `main.<index>` so conversion is mechanical (`main_0`, `main_2`, ...).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _normal(mean: float, std: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


def _torch_conv_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchBatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over NHWC: batch statistics in training (biased variance for the
    output, unbiased for the running variance, momentum 0.1, eps 1e-5), running ones otherwise.
    Statistics in float32 whatever the compute dtype."""

    features: int
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        scale = self.param("scale", _normal(1.0, 0.02), (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean_var = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
        var_var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                n = xf.size // self.features
                m = self.momentum
                mean_var.value = (1 - m) * mean_var.value + m * mean
                var_var.value = (1 - m) * var_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = mean_var.value, var_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `x` `[B, H, W, input_nc]` -> logits `[B, H', W', 1]`.

    `train=True` normalises with batch statistics and updates `batch_stats` (apply with
    `mutable=["batch_stats"]`), as the seed's discriminator does in training mode.
    """

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32

    def _conv(self, features: int, stride: int, in_features: int, bias: bool, index: int) -> nn.Conv:
        return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
                       kernel_init=_normal(0.0, 0.02), bias_init=_torch_conv_bias(in_features * 16),
                       dtype=self.dtype, name=f"main_{index}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        index = 0
        h = self._conv(self.ndf, 2, self.input_nc, True, index)(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        index += 2
        mult = 1
        for n in range(1, self.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * mult, stride, self.ndf * prev, False, index)(h)
            h = TorchBatchNorm(self.ndf * mult, name=f"main_{index + 1}")(h, train)
            h = nn.leaky_relu(h, 0.2)
            index += 3
        return self._conv(1, 1, self.ndf * mult, True, index)(h).astype(jnp.float32)


def discriminator_from_config(loss_params: dict[str, Any], dtype: Dtype = jnp.float32) -> NLayerDiscriminator:
    """The discriminator GeneralLPIPSWithDiscriminator builds: its `discriminator_config`, or
    NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers) by default."""
    cfg = loss_params.get("discriminator_config")
    if cfg is None:
        return NLayerDiscriminator(input_nc=int(loss_params.get("disc_in_channels", 3)),
                                   n_layers=int(loss_params.get("disc_num_layers", 3)), dtype=dtype)
    target = str(cfg.get("target", "")).rsplit(".", 1)[-1]
    params = dict(cfg.get("params", {}) or {})
    if target != "NLayerDiscriminator":
        raise ValueError(f"discriminator {cfg.get('target')!r} is not supported; sgm_jax implements NLayerDiscriminator")
    if params.pop("use_actnorm", False):
        raise ValueError("NLayerDiscriminator(use_actnorm=True) is not supported (its data-dependent ActNorm "
                         "init); use the seed's default BatchNorm (use_actnorm: False)")
    return NLayerDiscriminator(input_nc=int(params.get("input_nc", 3)), ndf=int(params.get("ndf", 64)),
                               n_layers=int(params.get("n_layers", 3)), dtype=dtype)
