"""tiny_sdxl with sd_xl_turbo's sampling defaults (SubstepSampler, 1 step, no guidance) for CPU tests.
Random weights only."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import tiny_sdxl


def get_config() -> ConfigDict:
    config = tiny_sdxl.get_config()
    config.inference.update(P.TURBO)
    return config
