"""sgm_jax: a JAX/Flax reimplementation of Stability AI's generative-models (sgm)."""

from sgm_jax.xla_cpu import apply_cpu_defaults as _apply_cpu_defaults
from sgm_jax.xla_cpu import skip_absent_tpu as _skip_absent_tpu

__version__ = "0.1.0"

_apply_cpu_defaults()
_skip_absent_tpu()
