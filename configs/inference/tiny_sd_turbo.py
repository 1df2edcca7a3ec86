"""tiny_sd_2_1 with sd_turbo's sampling defaults (SubstepSampler, 1 step, no guidance) for CPU tests.
Random weights only."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import tiny_sd_2_1


def get_config() -> ConfigDict:
    config = tiny_sd_2_1.get_config()
    config.inference.update(P.TURBO)
    return config
