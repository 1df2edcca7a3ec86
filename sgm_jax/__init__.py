"""sgm_jax: a JAX/Flax reimplementation of Stability AI's generative-models (sgm)."""

__version__ = "0.1.0"
