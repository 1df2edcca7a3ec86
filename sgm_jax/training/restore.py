"""Moved: trained-workdir sampling lives in sgm_jax.inference.workdir (TrainedModel). These names
stay importable for existing callers (tests/test_training.py, benchmarks/mnist_quality.py)."""

from sgm_jax.inference.workdir import example_batch, load_trained, read_workdir_config, sample_trained

load_config = read_workdir_config

__all__ = ["example_batch", "load_config", "load_trained", "sample_trained"]
