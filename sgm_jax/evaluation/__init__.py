"""Evaluation: FID (pytorch-fid's InceptionV3 in Flax), CLIP score (CLIP ViT-L/14), MNIST class
accuracy, reconstruction metrics (MSE / PSNR / SSIM); used by evaluate.py and, through
`in_training.make_training_evaluator`, by train.py's `config.eval`.

Names are imported lazily, so `sgm_jax.evaluation.pytorch_fid_ref` loads without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InceptionFeatures": "fid", "GaussianStats": "fid", "feature_statistics": "fid", "frechet_distance": "fid",
    "frechet_distance_stats": "fid", "load_statistics": "fid", "save_statistics": "fid",
    "make_training_evaluator": "in_training",
    "EVALUATORS": "registry", "EvalOptions": "registry", "build_evaluators": "registry", "evaluate_images": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sgm_jax.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sgm_jax.evaluation.{_EXPORTS[name]}"), name)
