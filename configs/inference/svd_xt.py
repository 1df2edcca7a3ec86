"""The seed's scripts/sampling/configs/svd_xt.yaml: Stable Video Diffusion XT (25 frames at
576x1024, 30 steps, LinearPredictionGuider 3.0 -> 1.5 over the frames), image to video.

    python convert_torch_weights.py --config configs/inference/svd_xt.py \\
        --checkpoint svd_xt.safetensors --output checkpoints/svd_xt
    python sample.py --config configs/inference/svd_xt.py --checkpoint checkpoints/svd_xt \\
        --init-image in.png --num-frames 25 --fps 6 --motion-bucket-id 127 --out video.mp4
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _svd as S


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = S.model(num_frames=25, max_scale=3.0, min_scale=1.5, num_steps=30)
    config.inference = S.inference(1024, 576, num_frames=25, num_steps=30, max_scale=3.0, min_scale=1.5)
    return config
