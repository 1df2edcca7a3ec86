"""LPIPS (VGG16 variant) in Flax; its weights are found and loaded by sgm_jax.autoencoding.lpips.

Mirrors `sgm/modules/autoencoding/lpips/loss/lpips.py` (richzhang/PerceptualSimilarity):
inputs in [-1, 1] are shifted and scaled per channel (a 1-channel image broadcasts to 3,
as in PyTorch), fed to torchvision's VGG16 `features` up to relu5_3; at relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3 both feature maps are unit-normalised over channels, their
squared difference is weighted by a 1x1 conv (`lin0`..`lin4`, no bias), averaged over space
and summed over the five taps. Result `[B]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision vgg16().features: (index of each conv, its output channels); a 2x2 max pool
# follows the last conv of each of the first four stages.
VGG_STAGES = (((0, 64), (2, 64)), ((5, 128), (7, 128)), ((10, 256), (12, 256), (14, 256)),
              ((17, 512), (19, 512), (21, 512)), ((24, 512), (26, 512), (28, 512)))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features[:30]`: `x` `[B, H, W, 3]` -> the five relu taps."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        h = x.astype(self.dtype)
        for i, stage in enumerate(VGG_STAGES):
            if i > 0:  # torchvision pools at the start of the next slice
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for index, channels in stage:
                h = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                    name=f"features_{index}")(h))
            taps.append(h)
        return taps


class LPIPS(nn.Module):
    """`(x0, x1)` images `[B, H, W, C]` in [-1, 1] (C = 1 or 3) -> distance `[B]`.

    `dropout_key`: the seed's NetLinLayer has Dropout(0.5) before each 1x1 head, and Lightning's
    `model.train()` switches it on during training although LPIPS was built with `.eval()`;
    passing a key reproduces that, None is the deterministic (evaluation) metric.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        b = x0.shape[0]
        both = jnp.concatenate([(x0 - shift) / scale, (x1 - shift) / scale], axis=0)  # one VGG pass
        taps = VGG16Features(self.dtype, name="net")(both)
        total = jnp.zeros((b,), jnp.float32)
        for k, (tap, channels) in enumerate(zip(taps, CHANNELS)):
            tap = tap.astype(jnp.float32)
            # The seed's normalize_tensor: x / (||x||_channels + 1e-10).
            unit = tap / (jnp.sqrt(jnp.sum(jnp.square(tap), axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(unit[:b] - unit[b:])
            if dropout_key is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, k), 0.5, diff.shape)
                diff = jnp.where(keep, diff / 0.5, 0.0)
            weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin{k}")(diff)
            total = total + jnp.mean(weighted, axis=(1, 2, 3))
        return total
