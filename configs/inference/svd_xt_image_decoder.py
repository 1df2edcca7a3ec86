"""The seed's scripts/sampling/configs/svd_xt_image_decoder.yaml: svd_xt.py with the per-frame image
decoder (an AutoencoderKL, no temporal layers) as first stage; weights `svd_xt_image_decoder.safetensors`.

    python convert_torch_weights.py --config configs/inference/svd_xt_image_decoder.py \\
        --checkpoint svd_xt_image_decoder.safetensors --output checkpoints/svd_xt_image_decoder
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _svd as S
from sgm_jax.configs.inference import svd_xt


def get_config() -> ConfigDict:
    config = svd_xt.get_config()
    config.model.params.first_stage_config = S.first_stage(image_decoder=True)
    return config
