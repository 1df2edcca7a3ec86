"""sgm_jax: a JAX/Flax reimplementation of Stability AI's generative-models (sgm)."""

from sgm_jax.xla_cpu import apply_cpu_defaults as _apply_cpu_defaults

__version__ = "0.1.0"

_apply_cpu_defaults()
