"""The seed's scripts/sampling/configs/svd.yaml: Stable Video Diffusion (14 frames at 576x1024,
25 steps, LinearPredictionGuider 2.5 -> 1.0), image to video; convert `svd.safetensors` as svd_xt."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _svd as S


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = S.model(num_frames=14, max_scale=2.5, min_scale=1.0, num_steps=25)
    config.inference = S.inference(1024, 576, num_frames=14, num_steps=25, max_scale=2.5, min_scale=1.0)
    return config
