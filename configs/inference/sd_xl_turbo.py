"""SDXL-Turbo: the seed's scripts/demo/turbo.py "SDXL-Turbo" entry, i.e. configs/inference/sd_xl_base.yaml
(the same architecture and checkpoint layout) sampled at 512 x 512 in 1 step without guidance.

    python convert_torch_weights.py --config configs/inference/sd_xl_turbo.py \
        --checkpoint sd_xl_turbo_1.0_fp16.safetensors --output checkpoints/sd_xl_turbo
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import sd_xl_base


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = sd_xl_base.model()
    # turbo.py conditions on original = target = 512 x 512, crop (0, 0), the one size it was distilled at
    config.inference = P.inference(512, 512, ["tokenizer", "tokenizer_2"], crop_coords_top_left=[0, 0],
                                   resolutions=((512, 512),), **P.TURBO)
    return config
