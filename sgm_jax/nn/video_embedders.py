"""Stable Video Diffusion's image conditioning, the seed's embedders in Flax (NHWC):

- `FrozenOpenCLIPImageEmbedder`: OpenCLIP's ViT-H-14 image tower on the conditioning frame,
  resized to 224x224 as the seed does with kornia (Gaussian antialias blur, then bicubic with
  align_corners=True: both linear maps, applied as two matrices) and CLIP-normalised:
  images `[B, H, W, 3]` in [-1, 1] -> `[B, 1024]`.
- `FrozenOpenCLIPImagePredictionEmbedder`: that embedding per video, `[B*n_cond_frames, 1024]`
  -> `[B*n_copies, n_cond_frames, 1024]` (the UNet's crossattn).
- `VideoPredictionEmbedderWithEncoder`: the conditioning frame's latents (an
  AutoencoderKLModeOnly's posterior mode, times scale_factor) repeated n_copies times,
  `[B, H, W, 3]` -> `[B*n_copies, H/8, W/8, 4]` (the UNet's concat), encoded in chunks of
  en_and_decode_n_samples_a_time.

Parameter names follow the seed's state dict: `open_clip/visual/...` is
`conditioner.embedders.N.open_clip.model.visual.*`, `encoder/...` `conditioner.embedders.N.encoder.*`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.nn.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionTower
from sgm_jax.nn.conditioner import _TORCH_ONLY_KWARGS, register_embedder
from sgm_jax.nn.layers import in_chunks
from sgm_jax.nn.resize import kornia_resize
from sgm_jax.nn.vae import autoencoder_from_config

# open_clip's ViT-H-14 (laion2b_s32b_b79k), the seed's default arch
VIT_H_14 = dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16, embed_dim=1024, act="gelu")


@register_embedder
class FrozenOpenCLIPImageEmbedder(nn.Module):
    """images [B, H, W, 3] in [-1, 1] -> image embeddings [B, embed_dim] (or [B, 1, embed_dim]
    with unsqueeze_dim). The seed's tower options other than these are its defaults here; its
    own ucg_rate (0 in every released config) is the conditioner's ucg_rate instead."""

    arch: str = "ViT-H-14"
    version: str = "laion2b_s32b_b79k"
    antialias: bool = True
    ucg_rate: float = 0.0
    unsqueeze_dim: bool = False
    repeat_to_max_len: bool = False
    num_image_crops: int = 0
    output_tokens: bool = False
    max_length: int = 77
    tower: Any = None  # CLIPVisionTower fields (None: ViT-H-14)
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.arch != "ViT-H-14" and self.tower is None:
            raise ValueError(f"FrozenOpenCLIPImageEmbedder: arch {self.arch!r} needs its tower fields (tower=...); "
                             "ViT-H-14 is built in")
        unsupported = {k: v for k, v in (("ucg_rate", self.ucg_rate), ("repeat_to_max_len", self.repeat_to_max_len),
                                         ("num_image_crops", self.num_image_crops),
                                         ("output_tokens", self.output_tokens)) if v}
        if unsupported:
            raise ValueError(f"FrozenOpenCLIPImageEmbedder options {unsupported} are not supported (SVD uses none; "
                             "drop out with the conditioner's ucg_rate)")
        self.visual = CLIPVisionTower(**dict(self.tower or VIT_H_14), dtype=self.dtype, name="visual")

    def __call__(self, images: jax.Array) -> jax.Array:
        size = self.visual.image_size
        x = kornia_resize(jnp.asarray(images), (size, size), self.antialias)
        x = ((x + 1.0) / 2.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
        z = self.visual(x)
        return z[:, None, :] if self.unsqueeze_dim else z


def _nested_params(config: Any) -> dict[str, Any]:
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in dict(config.get("params") or {}).items() if k not in _TORCH_ONLY_KWARGS}


@register_embedder
class FrozenOpenCLIPImagePredictionEmbedder(nn.Module):
    """images [B*n_cond_frames, H, W, 3] -> [B*n_copies, n_cond_frames, embed_dim]."""

    open_clip_embedding_config: Any
    n_cond_frames: int
    n_copies: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        z = FrozenOpenCLIPImageEmbedder(**_nested_params(self.open_clip_embedding_config), dtype=self.dtype,
                                        name="open_clip")(images)
        t = int(self.n_cond_frames)
        z = z.reshape((-1, t) + z.shape[1:])
        return jnp.repeat(z, int(self.n_copies), axis=0)


@register_embedder
class VideoPredictionEmbedderWithEncoder(nn.Module):
    """frames [B*n_cond_frames, H, W, 3] in [-1, 1] -> latents * scale_factor: with one
    conditioning frame [B*n_copies, h, w, c] (each video's latents repeated), else [B*t, h, w, c].
    The noise augmentation (sigma_sampler_config) is the sampling script's cond_aug, applied to the
    input before; a config that asks the embedder for it is refused."""

    n_cond_frames: int
    n_copies: int
    encoder_config: Any
    sigma_sampler_config: Any = None
    sigma_cond_config: Any = None
    is_ae: bool = False
    scale_factor: float = 1.0
    disable_encoder_autocast: bool = False
    en_and_decode_n_samples_a_time: int | None = None
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.sigma_sampler_config is not None or self.sigma_cond_config is not None:
            raise ValueError("VideoPredictionEmbedderWithEncoder: sigma_sampler_config / sigma_cond_config "
                             "(training-time noise augmentation) are not supported; SVD's inference configs "
                             "leave them out")
        if not self.is_ae:
            raise ValueError("VideoPredictionEmbedderWithEncoder: only is_ae=True (an autoencoder's encode) "
                             "is supported")
        config = self.encoder_config.to_dict() if hasattr(self.encoder_config, "to_dict") else self.encoder_config
        dtype = jnp.float32 if self.disable_encoder_autocast else self.dtype
        self.encoder = autoencoder_from_config(dict(config), dtype=dtype)

    def __call__(self, frames: jax.Array) -> jax.Array:
        z = in_chunks(lambda xs: self.encoder.encode_posterior(xs).mode(), jnp.asarray(frames),
                      self.en_and_decode_n_samples_a_time, loop=False)
        z = z.astype(jnp.float32) * self.scale_factor
        if int(self.n_cond_frames) == 1:
            z = jnp.repeat(z, int(self.n_copies), axis=0)
        return z
