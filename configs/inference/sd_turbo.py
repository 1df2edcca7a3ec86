"""SD-Turbo: the seed's scripts/demo/turbo.py "SD-Turbo" entry, i.e. configs/inference/sd_2_1.yaml
(SD 2.1-base, eps-prediction: the same architecture and checkpoint layout) sampled at 512 x 512
in 1 step without guidance.

    python convert_torch_weights.py --config configs/inference/sd_turbo.py \
        --checkpoint sd_turbo.safetensors --output checkpoints/sd_turbo
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import sd_2_1


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = sd_2_1.model()
    config.inference = P.inference(512, 512, ["tokenizer"], **P.TURBO)
    return config
