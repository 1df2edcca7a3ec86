"""The PyTorch / kornia image resizes the seed's embedders run, as linear maps (one matrix per
axis, applied with einsum): torch.nn.functional.interpolate (SpatialRescaler) and
kornia.geometry.resize's antialiased bicubic (SVD's OpenCLIP image embedder)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's bicubic kernel (A = -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_resize_matrix(n_in: int, scale: float, method: str) -> np.ndarray:
    """[n_out, n_in] weights reproducing torch.nn.functional.interpolate(scale_factor=scale)
    along one axis (align_corners=False, no antialias; n_out = floor(n_in * scale))."""
    n_out = int(math.floor(n_in * scale))
    dst = np.arange(n_out, dtype=np.float64)
    rows = np.arange(n_out)
    w = np.zeros((n_out, n_in), np.float64)
    if method == "nearest":
        w[rows, np.minimum(np.floor(dst / scale).astype(int), n_in - 1)] = 1.0
    elif method in ("linear", "bilinear", "trilinear"):
        src = np.maximum((dst + 0.5) / scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        lam = src - i0
        np.add.at(w, (rows, i0), 1.0 - lam)
        np.add.at(w, (rows, np.minimum(i0 + 1, n_in - 1)), lam)
    elif method == "bicubic":
        src = (dst + 0.5) / scale - 0.5
        i0 = np.floor(src).astype(int)
        t = src - i0
        for off in range(-1, 3):
            np.add.at(w, (rows, np.clip(i0 + off, 0, n_in - 1)), cubic(t - off))
    elif method == "area":  # adaptive average pooling to n_out
        for r in rows:
            lo, hi = (r * n_in) // n_out, -((-(r + 1) * n_in) // n_out)
            w[r, lo:hi] = 1.0 / (hi - lo)
    else:
        raise ValueError(f"unknown interpolation method {method!r}")
    return w.astype(np.float32)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """torch's "reflect" padding index (the edge sample not repeated)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i > n - 1, period - i, i)


@functools.lru_cache(maxsize=16)
def kornia_resize_matrix(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
    """[n_out, n_in] float32: kornia.geometry.resize(..., interpolation="bicubic",
    align_corners=True, antialias) along one axis. Antialiasing (when either side shrinks) is
    kornia's Gaussian blur, sigma = max((n_in / n_out - 1) / 2, 0.001), 2-sigma odd kernel of at
    least 3 taps, reflect borders; then torch's bicubic (A = -0.75) at i * (n_in - 1) / (n_out - 1)."""
    m = np.eye(n_in)
    if antialias:
        sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
        size = int(max(2.0 * 2 * sigma, 3))
        size = size if size % 2 else size + 1
        if n_in == 1:
            size = 1
        taps = np.arange(size) - size // 2
        g = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
        g /= g.sum()
        blur = np.zeros((n_in, n_in))
        rows = np.arange(n_in)
        for k, t in enumerate(taps):
            np.add.at(blur, (rows, _reflect(rows + t, n_in)), g[k])
        m = blur
    # source positions in float32, as torch computes them (its bicubic weights then follow exactly)
    scale = np.float32((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.floor(src).astype(int)
    t = (src - i0.astype(np.float32)).astype(np.float64)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for off in range(-1, 3):
        np.add.at(weights, (rows, np.clip(i0 + off, 0, n_in - 1)), cubic(t - off))
    return (weights @ m).astype(np.float32)


def kornia_resize(images: jax.Array, size: tuple[int, int], antialias: bool = True) -> jax.Array:
    """images [B, H, W, C] -> [B, size[0], size[1], C] as kornia's antialiased bicubic resize."""
    rows = jnp.asarray(kornia_resize_matrix(images.shape[1], size[0], antialias))
    cols = jnp.asarray(kornia_resize_matrix(images.shape[2], size[1], antialias))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, images.astype(jnp.float32), precision=hp)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp)
