"""Flax linen networks: UNet, VAE, text towers and the conditioner (NHWC, float32 params)."""

from sgm_jax.nn.conditioner import GeneralConditioner, build_conditioner, get_unconditional_conditioning
from sgm_jax.nn.text import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from sgm_jax.nn.unet import UNetModel
from sgm_jax.nn.vae import AutoencoderKL
# Registers its VideoDecoder with sgm_jax.nn.vae, so every AutoencoderKL can build SVD's decoder.
from sgm_jax.nn.video_vae import VideoDecoder

__all__ = [
    "AutoencoderKL", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2",
    "GeneralConditioner", "UNetModel", "VideoDecoder", "build_conditioner", "get_unconditional_conditioning",
]
