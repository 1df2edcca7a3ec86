"""The seed's temporal first-stage decoder (`sgm/modules/autoencoding/temporal_ae.py`) in Flax, NHWC.

Stable Video Diffusion's first stage is an AutoencodingEngine whose encoder is the image
Encoder of `sgm_jax.nn.vae` and whose decoder is a `VideoDecoder`: that module's Decoder with
temporal layers added, chosen by `time_mode` as in the seed:
  * "conv-only" (SVD): every res block is a VideoResBlock (the spatial ResnetBlock, then
    `time_stack`, a 3-d openaimodel ResBlock without timestep input over `[B, T, H, W, C]`,
    blended with the spatial output by a learned `mix_factor`), and `conv_out` is an
    AE3DConv (the 3x3 conv, then the Conv3d `time_mix_conv` over frames);
  * "all": also every attention block a VideoBlock (spatial attention, then a single-head
    VideoTransformerBlock `time_mix_block` over the frames of each pixel, blended);
  * "attn-only": the VideoBlocks only.
The seed's MemoryEfficientVideoBlock ("vanilla-xformers") computes what VideoBlock does
(jax.nn.dot_product_attention picks the kernel), so both build VideoBlock.

Frames are folded into the batch, video-major (frame `t` of video `b` at row `b*T + t`), and
`timesteps` is T. Module names follow the seed's state dict: `mix_factor` at the block's level,
`time_stack.in_layers.0`, `conv_out.time_mix_conv`, `time_mix_block.*`, `video_time_embed.0`,
so `sgm_jax.convert.vae`'s mechanical key map covers them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.nn.layers import timestep_embedding
from sgm_jax.nn.unet import ResBlock, _MLP, _conv as _conv_nd
from sgm_jax.nn.vae import AttnBlock, Decoder, ResnetBlock, _conv, register_decoder
from sgm_jax.nn.video_unet import AlphaBlender, VideoTransformerBlock

Dtype = Any
TIME_MODES = ("all", "conv-only", "attn-only")
# temporal_ae's blocks know these two (the UNet's "learned_with_images" is not one of them).
VIDEO_MERGE_STRATEGIES = ("fixed", "learned")
_VIDEO_ATTN_TYPES = ("vanilla", "vanilla-xformers")


def _video_kernel(video_kernel_size: int | Sequence[int] | None) -> int | tuple[int, ...]:
    # The seed's VideoResBlock reads None as [3, 1, 1] (over time only).
    if video_kernel_size is None:
        return (3, 1, 1)
    return int(video_kernel_size) if isinstance(video_kernel_size, int) else tuple(int(k) for k in video_kernel_size)


def _unfold(x: jax.Array, timesteps: int) -> jax.Array:
    """`[B*T, ...]` -> `[B, T, ...]`."""
    if x.shape[0] % timesteps:
        raise ValueError(f"{x.shape[0]} frames do not fold into videos of timesteps={timesteps}")
    return x.reshape((x.shape[0] // timesteps, timesteps) + x.shape[1:])


def _blender(module: nn.Module, alpha: float, merge_strategy: str) -> AlphaBlender:
    """An AlphaBlender whose `mix_factor` lives in `module`'s own params, where the seed's
    temporal_ae blocks register it (not under a `time_mixer` child as in the VideoUNet)."""
    blender = AlphaBlender(alpha, merge_strategy)
    nn.share_scope(module, blender)
    return blender


class VideoResBlock(ResnetBlock):
    """temporal_ae's VideoResBlock: the ResnetBlock (params at this level), `time_stack`, and
    `alpha * temporal + (1 - alpha) * spatial` with alpha = sigmoid(mix_factor) ("learned")
    or `alpha` ("fixed").

    `x` `[B*T, H, W, Cin]` -> `[B*T, H, W, out_channels]`; `timesteps` = T.
    """

    video_kernel_size: int | Sequence[int] | None = 3
    alpha: float = 0.0
    merge_strategy: str = "learned"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, timesteps: int = 1) -> jax.Array:
        spatial = self._residual(x, deterministic)
        bt, h, w, c = spatial.shape
        temporal = ResBlock(
            c, dropout=self.dropout, out_channels=c, deterministic=deterministic, dims=3,
            kernel_size=_video_kernel(self.video_kernel_size), skip_t_emb=True, dtype=self.dtype,
            name="time_stack",
        )(_unfold(spatial, timesteps), None).reshape(bt, h, w, c)
        # The seed weights the *temporal* path by alpha here (the VideoUNet's blender weights
        # the spatial one), so the two go in swapped.
        return _blender(self, self.alpha, self.merge_strategy)(temporal, spatial)


class AE3DConv(nn.Conv):
    """temporal_ae's AE3DConv: this 2-d conv (params `kernel`, `bias`), then the Conv3d
    `time_mix_conv` (out -> out channels, `video_kernel_size`, padding k // 2) over frames.

    `x` `[B*T, H, W, Cin]` -> `[B*T, H', W', features]`; `timesteps` = T.
    """

    video_kernel_size: int | Sequence[int] | None = 3

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: int = 1) -> jax.Array:
        h = super().__call__(x)
        bt, hh, ww, c = h.shape
        mix = _conv_nd(c, _video_kernel(self.video_kernel_size), self.dtype, "time_mix_conv", dims=3)
        return mix(_unfold(h, timesteps)).reshape(bt, hh, ww, c)


class VideoBlock(AttnBlock):
    """temporal_ae's VideoBlock (and MemoryEfficientVideoBlock): the AttnBlock's attention,
    then over the frames of each pixel a single-head VideoTransformerBlock (`ff_in`, no
    context) after a learned frame embedding (`video_time_embed`), blended as
    `alpha * spatial + (1 - alpha) * temporal`, then proj_out and the residual.

    `x` `[B*T, H, W, C]` -> same shape; `timesteps` = T.
    """

    alpha: float = 0.0
    merge_strategy: str = "learned"

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: int = 1) -> jax.Array:
        h = self._attend(x)
        bt, hh, ww, c = h.shape
        _unfold(h, timesteps)  # checks the fold
        tokens = h.reshape(bt, hh * ww, c)
        # Each row's frame index, embedded like a timestep (the seed's repeat_only=False).
        frame = jnp.tile(jnp.arange(timesteps, dtype=jnp.float32), bt // timesteps)
        emb = _MLP(4 * c, dtype=self.dtype, out_features=c, name="video_time_embed")(timestep_embedding(frame, c))
        temporal = VideoTransformerBlock(c, 1, c, ff_in=True, dtype=self.dtype, name="time_mix_block")(
            tokens + emb[:, None, :].astype(tokens.dtype), None, timesteps)
        h = _blender(self, self.alpha, self.merge_strategy)(tokens, temporal).reshape(bt, hh, ww, c)
        h = _conv(c, 1, "proj_out", self.dtype)(h)
        return x.astype(h.dtype) + h


@register_decoder  # AutoencoderKL(decoder_target="VideoDecoder") builds it
class VideoDecoder(Decoder):
    """temporal_ae's VideoDecoder: the Decoder with its blocks swapped per `time_mode`.

    Latent `[B*T, h, w, z_channels]` -> `[B*T, h*f, w*f, out_ch]` in `dtype`; `timesteps` = T
    (None: the whole batch is one clip of B frames, as the seed decodes each chunk of
    `decoding_t` frames). Params are float32; group norms compute in float32.
    """

    video_kernel_size: int | Sequence[int] | None = 3
    alpha: float = 0.0
    merge_strategy: str = "learned"
    time_mode: str = "conv-only"

    @staticmethod
    def config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The VideoDecoder-only keyword arguments of a seed `decoder_config.params`."""
        kernel = cfg.get("video_kernel_size", 3)
        return dict(video_kernel_size=kernel if kernel is None or isinstance(kernel, int) else tuple(kernel),
                    alpha=float(cfg.get("alpha", 0.0)), merge_strategy=str(cfg.get("merge_strategy", "learned")),
                    time_mode=str(cfg.get("time_mode", "conv-only")))

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, timesteps: int | None = None) -> jax.Array:
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"time_mode {self.time_mode!r} not in {TIME_MODES}")
        if self.merge_strategy not in VIDEO_MERGE_STRATEGIES:
            raise ValueError(f"merge_strategy {self.merge_strategy!r} not in {VIDEO_MERGE_STRATEGIES}")
        if self._video_attn and self.attn_type not in _VIDEO_ATTN_TYPES:
            raise ValueError(f"time_mode {self.time_mode!r} needs attn_type in {_VIDEO_ATTN_TYPES}")
        timesteps = z.shape[0] if timesteps is None else int(timesteps)
        _unfold(z, timesteps)  # a clear error before any layer runs
        return super().__call__(z, deterministic, timesteps)

    @property
    def _video_attn(self) -> bool:
        return self.time_mode != "conv-only"

    def _resnet(self, h: jax.Array, out_channels: int, name: str, deterministic: bool,
                timesteps: int | None) -> jax.Array:
        if self.time_mode == "attn-only":
            return super()._resnet(h, out_channels, name, deterministic, timesteps)
        return VideoResBlock(out_channels, self.dropout, self.dtype, video_kernel_size=self.video_kernel_size,
                             alpha=self.alpha, merge_strategy=self.merge_strategy, name=name)(
            h, deterministic, timesteps)

    def _attn(self, h: jax.Array, name: str, timesteps: int | None) -> jax.Array:
        if not self._video_attn:
            return super()._attn(h, name, timesteps)
        return VideoBlock(dtype=self.dtype, alpha=self.alpha, merge_strategy=self.merge_strategy, name=name)(
            h, timesteps)

    def _conv_out(self, h: jax.Array, timesteps: int | None) -> jax.Array:
        if self.time_mode == "attn-only":  # the seed's Conv2DWrapper: a plain conv_out
            return super()._conv_out(h, timesteps)
        return AE3DConv(self.out_ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        video_kernel_size=self.video_kernel_size, name="conv_out")(h, timesteps)
