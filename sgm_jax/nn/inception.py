"""The InceptionV3 that FID is defined with: pytorch-fid's `InceptionV3(use_fid_inception=True)`,
i.e. torchvision's Inception3 trunk with the FID blocks (`FIDInceptionA`, `FIDInceptionC`,
`FIDInceptionE_1`, `FIDInceptionE_2`) that reproduce TensorFlow's 2015-12-05 graph, in Flax.

`FIDInceptionV3()(x)` takes NHWC images in [0, 1] (any size; grey images are repeated to RGB by
`sgm_jax.evaluation.fid.prepare_images`), resizes them to 299x299 exactly as
`F.interpolate(mode="bilinear", align_corners=False)` does (no antialiasing), scales to
[-1, 1] and returns the pool3 features `[B, 2048]`.

Module names are the PyTorch state dict's (`Mixed_5b.branch5x5_1.conv.weight`), one Flax param
per tensor (batch-norm statistics included, as params: the network is only ever run frozen),
so `sgm_jax.convert.inception` maps pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` keys
mechanically. Params are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
FID_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision's BasicConv2d


@functools.lru_cache(maxsize=16)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` interpolation weights of torch's bilinear resize with align_corners=False
    (half-pixel centres, source index clamped at 0, no antialiasing), so a resize is two matmuls."""
    # float32 coordinates, as torch computes them (a float64 grid differs by ~1e-5 at large sizes)
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float64)
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """NHWC `[B, H, W, C]` -> `[B, size, size, C]`, torch's bilinear (align_corners=False)."""
    rows = jnp.asarray(bilinear_matrix(x.shape[1], size))
    cols = jnp.asarray(bilinear_matrix(x.shape[2], size))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


class FrozenBatchNorm(nn.Module):
    """Inference batch norm with the four torch tensors as params: `scale` (weight), `bias`,
    `running_mean`, `running_var`."""

    features: int
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("running_mean", nn.initializers.zeros, (self.features,))
        var = self.param("running_var", nn.initializers.ones, (self.features,))
        mult = scale * jax.lax.rsqrt(var + self.eps)
        return x * mult.astype(x.dtype) + (bias - mean * mult).astype(x.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU. `padding`: (ph, pw) as torch's."""

    features: int
    kernel: Sequence[int]
    stride: int = 1
    padding: Sequence[int] = (0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, tuple(self.kernel), (self.stride, self.stride), ((ph, ph), (pw, pw)),
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool, which the FID blocks reproduce: padded zeros are not counted.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    """FIDInceptionA: 1x1 | 5x5 | double 3x3 | avg-pool (no padded zeros) + 1x1."""

    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(conv(48, (1, 1), name="branch5x5_1")(x))
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a): strided 3x3 | double 3x3 | max pool."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC: 1x1 | 1x7-7x1 | double 7x1-1x7 | avg-pool (no padded zeros) + 1x1."""

    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a): 1x1-strided 3x3 | 1x7-7x1-strided 3x3 | max pool."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(conv(192, (1, 1), name="branch3x3_1")(x))
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (`pool="avg"`, no padded zeros) / FIDInceptionE_2 (`pool="max"`, the
    TensorFlow graph's max pool): 1x1 | 3x3 split | double 3x3 split | pool + 1x1."""

    pool: str = "avg"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """`[B, H, W, 3]` in [0, 1] -> pool3 features `[B, 2048]` (float32).

    resize_input / normalize_input as pytorch-fid's InceptionV3 (both on by default there).
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, FID_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(self.dtype)
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, self.dtype, name=name)(x)
        x = InceptionB(self.dtype, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, self.dtype, name=name)(x)
        x = InceptionD(self.dtype, name="Mixed_7a")(x)
        x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # adaptive average pool to 1x1


def abstract_inception_params(model: FIDInceptionV3 | None = None) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (shapes only, nothing computed)."""
    model = model or FIDInceptionV3()
    x = jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def random_inception_params(seed: int = 0) -> dict[str, Any]:
    """Well-scaled random params (He-normal convs, batch-norm scale / variance in [0.5, 1.5]):
    the real network's shapes and activation scale without its weights, for plumbing tests and
    speed measurements where pytorch-fid's weight file is absent. Never for reported FIDs."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_dict(abstract_inception_params()).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif path[-1] in ("scale", "running_var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        flat[path] = value.astype(np.float32)
    return unflatten_dict(flat)
