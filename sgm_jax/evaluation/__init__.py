"""Evaluation: FID (pytorch-fid's InceptionV3 in Flax), CLIP score (CLIP ViT-L/14), MNIST class
accuracy, reconstruction metrics (MSE / PSNR / SSIM); used by evaluate.py and, through
`in_training.make_training_evaluator`, by train.py's `config.eval`."""

from sgm_jax.evaluation.fid import (InceptionFeatures, feature_statistics, frechet_distance, load_statistics,
                                    save_statistics)
from sgm_jax.evaluation.in_training import make_training_evaluator
from sgm_jax.evaluation.registry import EVALUATORS, EvalOptions, build_evaluators, evaluate_images

__all__ = ["EVALUATORS", "EvalOptions", "InceptionFeatures", "build_evaluators", "evaluate_images",
           "feature_statistics", "frechet_distance", "load_statistics", "make_training_evaluator", "save_statistics"]
