"""The seed's configs/inference/sd_2_1_768.yaml: Stable Diffusion 2.1, 768 px, v-prediction
(VScaling); otherwise identical to sd_2_1."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import sd_2_1


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = sd_2_1.model(scaling="VScaling")
    config.inference = P.inference(768, 768, ["tokenizer"])
    return config
