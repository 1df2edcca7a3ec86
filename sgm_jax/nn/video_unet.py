"""The seed's `video_model.VideoUNet` (Stable Video Diffusion) in Flax linen, NHWC.

Frames are folded into the batch as in the seed: `x` is `[B*T, H, W, C]`, video-major
(frame `t` of video `b` at row `b*T + t`). Every UNet layer of `sgm_jax.nn.unet` is reused;
the video layers add a temporal path after the spatial one and blend the two:
  * VideoResBlock = the spatial ResBlock, then `time_stack` (a 3-d ResBlock over
    `[B, T, H, W, C]`, convs of `video_kernel_size`) and `time_mixer` (AlphaBlender);
  * SpatialVideoTransformer = the SpatialTransformer, where after each spatial block a
    `time_stack_{i}` VideoTransformerBlock attends over the T frames of each pixel, with a
    learned frame-position embedding (`time_pos_embed`), and `time_mixer` blends.
Names mirror the seed's modules, so `sgm_jax.convert.unet`'s mechanical key map covers it.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.nn.attention import BasicTransformerBlock, Context, SpatialTransformer, layer_norm
from sgm_jax.nn.layers import remat, timestep_embedding
from sgm_jax.nn.unet import LayerSpec, ResBlock, UNetModel, UNetPlan, _MLP

Dtype = Any
MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


class AlphaBlender(nn.Module):
    """The seed's AlphaBlender: `alpha * x_spatial + (1 - alpha) * x_temporal`.

    alpha: "fixed" `alpha` (a constant: the seed's buffer, not trained); "learned"
    `sigmoid(mix_factor)`; "learned_with_images" the same, but 1 (spatial only) on the frames
    where `image_only_indicator` `[B, T]` is set. Inputs `[B*T, ...]`, frames folded.
    """

    alpha: float
    merge_strategy: str = "learned_with_images"

    @nn.compact
    def __call__(self, x_spatial: jax.Array, x_temporal: jax.Array,
                 image_only_indicator: jax.Array | None = None) -> jax.Array:
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge_strategy {self.merge_strategy!r} not in {MERGE_STRATEGIES}")
        if self.merge_strategy == "fixed":
            alpha = jnp.float32(self.alpha)
        else:
            mix = self.param("mix_factor", nn.initializers.constant(self.alpha), (1,), jnp.float32)
            alpha = jax.nn.sigmoid(mix)[0]
        if self.merge_strategy == "learned_with_images":
            if image_only_indicator is None:
                raise ValueError('merge_strategy "learned_with_images" needs image_only_indicator')
            alpha = jnp.where(image_only_indicator.astype(bool), 1.0, alpha).reshape(-1)
            alpha = alpha.reshape(alpha.shape + (1,) * (x_spatial.ndim - 1))  # [B*T, 1, ...]
        alpha = alpha.astype(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


def _num_frames(image_only_indicator: jax.Array, batch: int) -> int:
    videos, frames = image_only_indicator.shape
    if videos * frames != batch:
        raise ValueError(f"image_only_indicator {image_only_indicator.shape} does not fold into batch {batch}")
    return frames


class VideoResBlock(ResBlock):
    """The seed's VideoResBlock: ResBlock (params at this level) + `time_stack` + `time_mixer`.

    `x` `[B*T, H, W, channels]`, `emb` `[B*T, E]`, `image_only_indicator` `[B, T]` (T is
    read from its shape) -> `[B*T, H', W', out_channels]`.
    """

    video_kernel_size: int | Sequence[int] = 3
    merge_strategy: str = "fixed"
    merge_factor: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, image_only_indicator: jax.Array) -> jax.Array:
        x = self._residual(x, emb)
        bt, h, w, c = x.shape
        t = _num_frames(image_only_indicator, bt)
        kernel = self.video_kernel_size
        temporal = ResBlock(
            c, dropout=self.dropout, out_channels=c, deterministic=self.deterministic, dims=3,
            kernel_size=kernel if isinstance(kernel, int) else tuple(int(k) for k in kernel),
            dtype=self.dtype, name="time_stack",
        )(x.reshape(bt // t, t, h, w, c), emb.reshape(bt // t, t, emb.shape[-1]))
        mixer = AlphaBlender(self.merge_factor, self.merge_strategy, name="time_mixer")
        return mixer(x, temporal.reshape(bt, h, w, c), image_only_indicator)


class VideoTransformerBlock(BasicTransformerBlock):
    """The seed's VideoTransformerBlock: a transformer block over the frames of each token.

    `x` `[B*T, S, dim]` -> regrouped `[B*S, T, inner_dim]` -> `ff_in` (with `norm_in`),
    `attn1` (self; with `disable_self_attn` it attends to `context`), `attn2` (cross to
    `context` `[B*S, L, D]`; self when None), `ff` -> back to `[B*T, S, dim]`.
    """

    ff_in: bool = False
    inner_dim: int | None = None
    disable_temporal_crossattention: bool = False
    switch_temporal_ca_to_sa: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, timesteps: int) -> jax.Array:
        inner = self.inner_dim or self.dim
        if self.n_heads * self.d_head != inner:
            raise ValueError(f"n_heads * d_head = {self.n_heads * self.d_head} != inner_dim {inner}")
        if self.disable_temporal_crossattention and self.switch_temporal_ca_to_sa:
            raise ValueError("switch_temporal_ca_to_sa needs the temporal cross-attention")
        det, dt, is_res = self.deterministic, self.dtype, inner == self.dim
        bt, s, c = x.shape
        b = bt // timesteps
        x = x.reshape(b, timesteps, s, c).transpose(0, 2, 1, 3).reshape(b * s, timesteps, c)
        # The seed: ff_in = ff_in or inner_dim is not None (SpatialVideoTransformer always
        # passes inner_dim, so its blocks always have ff_in, whatever extra_ff_mix_layer says).
        if self.ff_in or self.inner_dim is not None:
            h = self._feed_forward("ff_in", self.dim, inner)(layer_norm(dt, "norm_in")(x), det)
            x = h + x if is_res else h
        ctx1 = context if self.disable_self_attn else None
        x = self._attention("attn1", inner)(layer_norm(dt, "norm1")(x), ctx1, det) + x
        if not self.disable_temporal_crossattention:
            ctx2 = None if self.switch_temporal_ca_to_sa else context
            x = self._attention("attn2", inner)(layer_norm(dt, "norm2")(x), ctx2, det) + x
        h = self._feed_forward("ff", inner, self.dim)(layer_norm(dt, "norm3")(x), det)
        x = h + x if is_res else h
        return x.reshape(b, s, timesteps, -1).transpose(0, 2, 1, 3).reshape(bt, s, -1)


class SpatialVideoTransformer(SpatialTransformer):
    """The seed's SpatialVideoTransformer: SpatialTransformer + per-block time mixing.

    `x` `[B*T, H, W, C]`, `context` `[B*T, L, D]` (with `use_spatial_context` the temporal
    blocks attend to each video's first-frame context), `time_context` `[B, L', D']` or
    `[B, D']` (without `use_spatial_context`), `image_only_indicator` `[B, T]`.
    """

    time_context_dim: int | None = None
    ff_in: bool = False
    use_spatial_context: bool = False
    merge_strategy: str = "fixed"
    merge_factor: float = 0.5
    disable_temporal_crossattention: bool = False
    max_time_embed_period: int = 10000

    @nn.compact
    def __call__(self, x: jax.Array, context: Context = None, time_context: jax.Array | None = None,
                 image_only_indicator: jax.Array | None = None) -> jax.Array:
        bt, h, w, _ = x.shape
        t = _num_frames(image_only_indicator, bt)
        if self.use_spatial_context:
            if context is None or isinstance(context, (list, tuple)) or context.ndim != 3:
                raise ValueError("use_spatial_context needs one [B*T, L, D] context")
            # Each video's first-frame context, once per pixel: [(B*H*W), L, D], video-major
            # like the [(B*S), T, C] tokens of the temporal blocks.
            time_context = jnp.repeat(context[::t], h * w, axis=0)
        elif time_context is not None:
            time_context = jnp.repeat(time_context, h * w, axis=0)
            if time_context.ndim == 2:
                time_context = time_context[:, None, :]

        # The frame index of every row, embedded like a timestep: [B*T, 1, C].
        frame = jnp.tile(jnp.arange(t, dtype=jnp.float32), bt // t)
        t_emb = timestep_embedding(frame, self.in_channels, max_period=self.max_time_embed_period)
        pos = _MLP(self.in_channels * 4, dtype=self.dtype, out_features=self.in_channels,
                   name="time_pos_embed")(t_emb)[:, None, :]
        block_cls = remat(VideoTransformerBlock, self.remat_policy, (3,)) if self.use_checkpoint \
            else VideoTransformerBlock
        inner = self.n_heads * self.d_head
        # One mixer for every depth, as the seed's single `time_mixer`.
        mixer = AlphaBlender(self.merge_factor, self.merge_strategy, name="time_mixer")

        def mix_over_time(i: int, tokens: jax.Array) -> jax.Array:
            temporal = block_cls(
                inner, self.n_heads, self.d_head, dropout=self.dropout, ff_in=self.ff_in,
                inner_dim=inner, disable_self_attn=self.disable_self_attn,
                disable_temporal_crossattention=self.disable_temporal_crossattention,
                deterministic=self.deterministic, attn_implementation=self.attn_implementation,
                dtype=self.dtype, name=f"time_stack_{i}",
            )(tokens + pos.astype(tokens.dtype), time_context, t)
            return mixer(tokens, temporal, image_only_indicator)

        return self._transform(x, context, mix_over_time)



class VideoUNet(UNetModel):
    """The seed's VideoUNet: UNetModel's layout with video res blocks and transformers.

    Call: `model.apply({"params": p}, x, timesteps, context, y=None, time_context=None,
    num_video_frames=None, image_only_indicator=None, deterministic=True)`
      x: `[B*T, H, W, in_channels]` (SVD: 8 = noisy latents + the conditioning frame's);
      timesteps `[B*T]`; context `[B*T, L, context_dim]`; y `[B*T, adm_in_channels]`
      ("sequential"); image_only_indicator `[B, T]` (1: a frame trained as a still image,
      spatial path only; SVD samples with zeros). T is `num_video_frames` or the indicator's
      second axis; without an indicator (not allowed for "learned_with_images") it is zeros.
    Returns `[B*T, H, W, out_channels]` in `dtype`.

    Takes the seed's VideoUNet keyword names (those UNetModel shares, plus the video ones
    below); UNetModel's other options keep their defaults, which are the seed's VideoUNet.
    `extra_ff_mix_layer` has no effect, as in the seed (see VideoTransformerBlock).
    """

    context_dim: int | Sequence[int] | None = None
    time_downup: bool = False
    time_context_dim: int | None = None
    extra_ff_mix_layer: bool = False
    use_spatial_context: bool = False
    merge_strategy: str = "fixed"
    merge_factor: float = 0.5
    video_kernel_size: int | Sequence[int] = 3
    disable_temporal_crossattention: bool = False
    max_ddpm_temb_period: int = 10000

    def _check_config(self) -> None:
        super()._check_config()
        if self.context_dim is None:
            raise ValueError("VideoUNet needs context_dim (the seed asserts it)")
        if self.time_downup:
            raise NotImplementedError("time_downup (resampling over time) is not implemented")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(f"merge_strategy {self.merge_strategy!r} not in {MERGE_STRATEGIES}")
        unsupported = [name for name, default in (
            ("legacy", False), ("disable_self_attentions", None), ("num_attention_blocks", None),
            ("disable_middle_self_attn", False), ("disable_middle_transformer", False),
            ("use_spatial_transformer", None)) if getattr(self, name) != default]
        if unsupported:
            raise ValueError(f"VideoUNet has no option {', '.join(unsupported)} (UNetModel only)")

    def build_plan(self, deterministic: bool = True) -> UNetPlan:
        """UNetModel's plan with every ResBlock a VideoResBlock and every SpatialTransformer
        a SpatialVideoTransformer (same widths, heads, depths and names)."""
        plan = super().build_plan(deterministic)
        res_cls = remat(VideoResBlock, self.remat_policy) if self.use_checkpoint else VideoResBlock
        res_kw = dict(video_kernel_size=self.video_kernel_size, merge_strategy=self.merge_strategy,
                      merge_factor=self.merge_factor)
        attn_kw = dict(
            dropout=self.dropout, time_context_dim=self.time_context_dim, ff_in=self.extra_ff_mix_layer,
            use_spatial_context=self.use_spatial_context, merge_strategy=self.merge_strategy,
            merge_factor=self.merge_factor, max_time_embed_period=self.max_ddpm_temb_period,
            disable_temporal_crossattention=self.disable_temporal_crossattention)

        def video(spec: LayerSpec) -> LayerSpec:
            kind, _, kwargs = spec
            if kind == "res":
                return "video_res", res_cls, {**kwargs, **res_kw}
            if kind == "attn":
                return "video_attn", SpatialVideoTransformer, {**kwargs, **attn_kw}
            return spec

        return UNetPlan([[video(s) for s in block] for block in plan.input_blocks],
                        [video(s) for s in plan.middle_block],
                        [[video(s) for s in block] for block in plan.output_blocks])

    def example_inputs(self, batch: int = 1, size: int | None = None, num_frames: int = 1) -> dict[str, Any]:
        """Zeros for `init` / `jax.eval_shape`: `batch` videos of `num_frames` frames."""
        out = super().example_inputs(batch * num_frames, size)
        out["image_only_indicator"] = jnp.zeros((batch, num_frames), jnp.float32)
        if self.time_context_dim is not None and not self.use_spatial_context:
            out["time_context"] = jnp.zeros((batch, 1, int(self.time_context_dim)), jnp.float32)
        return out

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: Context = None,
        y: jax.Array | None = None,
        time_context: jax.Array | None = None,
        num_video_frames: int | None = None,
        image_only_indicator: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        if image_only_indicator is None:
            if self.merge_strategy == "learned_with_images":
                raise ValueError('merge_strategy "learned_with_images" needs image_only_indicator')
            if num_video_frames is None:
                raise ValueError("VideoUNet needs num_video_frames or image_only_indicator")
            image_only_indicator = jnp.zeros((x.shape[0] // num_video_frames, num_video_frames))
        elif num_video_frames is not None and image_only_indicator.shape[1] != num_video_frames:
            raise ValueError(f"image_only_indicator {image_only_indicator.shape} has not "
                             f"num_video_frames={num_video_frames} frames")
        _num_frames(image_only_indicator, x.shape[0])
        return self._unet(x, timesteps, context, y, deterministic, image_only_indicator=image_only_indicator,
                          time_context=time_context)
