"""The seed's scripts/sampling/configs/svd_image_decoder.yaml: svd.py with the per-frame image
decoder (an AutoencoderKL, no temporal layers) as first stage; weights `svd_image_decoder.safetensors`.

    python convert_torch_weights.py --config configs/inference/svd_image_decoder.py \\
        --checkpoint svd_image_decoder.safetensors --output checkpoints/svd_image_decoder
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _svd as S
from sgm_jax.configs.inference import svd


def get_config() -> ConfigDict:
    config = svd.get_config()
    config.model.params.first_stage_config = S.first_stage(image_decoder=True)
    return config
