"""Paired reconstruction metrics (autoencoders, img2img): MSE, PSNR and SSIM between images and
their references, on pixel values mapped to [0, 1].

SSIM is Wang et al.'s with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
(co)variances, averaged over the pixels where the window fits and over channels: scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`, which tests/test_evaluation.py checks against.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sgm_jax.evaluation.fid import prepare_images


@jax.jit
def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image SSIM `[N]` of float `[N, H, W, C]` images in [0, 1] (H, W >= 11): dm-pix's, whose
    defaults are the ones above."""
    import dm_pix

    return dm_pix.ssim(x, y, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03)


def reconstruction_metrics(images: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Mean MSE, PSNR (dB, peak 1) and SSIM over pairs; images uint8 or float in [-1, 1]."""
    x, y = prepare_images(images), prepare_images(references)
    if x.shape != y.shape:
        raise ValueError(f"reconstruction metrics compare pairs: images {x.shape} vs references {y.shape}")
    if min(x.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {x.shape[1]}x{x.shape[2]}")
    mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
    psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(np.mean(ssim(x, y)))}


class ReconstructionEvaluator:
    """`evaluator(images, _) -> {"mse", "psnr", "ssim"}` against references in the same order."""

    name = "reconstruction"
    needs = None

    def __init__(self, references: np.ndarray):
        self.references = references

    def __call__(self, images: np.ndarray, conditioning: Any = None) -> dict[str, float]:
        return reconstruction_metrics(images, self.references[: len(images)])
