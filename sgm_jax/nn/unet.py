"""The seed's `openaimodel.UNetModel` in Flax linen, NHWC.

Submodule names mirror the seed's module tree so the checkpoint key map is mechanical: a
Flax name `input_blocks_4` is the seed's `input_blocks.4`, the children of a
TimestepEmbedSequential are named `0`, `1`, `2`, and `in_layers_2` is `in_layers.2`
(see `sgm_jax.convert.unet`).

Parameters are created in float32 (`param_dtype`); `dtype` is the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.nn.attention import Context, SpatialTransformer
from sgm_jax.nn.layers import GroupNorm, remat, timestep_embedding, zeros_init

Dtype = Any
_PAD1 = ((1, 1), (1, 1))  # torch padding=1; Flax "SAME" differs for stride 2 on even sizes


def _conv(
    features: int, kernel: int | Sequence[int], dtype: Dtype, name: str, stride: int = 1,
    zero: bool = False, dims: int = 2,
) -> nn.Conv:
    """The seed's conv_nd with padding `k // 2` per axis; an int kernel is square (cubic)."""
    size = (int(kernel),) * dims if isinstance(kernel, int) else tuple(int(k) for k in kernel)
    pad = tuple((k // 2, k // 2) for k in size)
    kw = {"kernel_init": zeros_init()} if zero else {}
    return nn.Conv(features, size, (stride,) * len(size), padding=pad, dtype=dtype, name=name, **kw)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 `conv`. `[B,H,W,C]` -> `[B,2H,2W,C']`."""

    channels: int
    use_conv: bool
    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.use_conv:
            x = _conv(self.out_channels or self.channels, 3, self.dtype, "conv")(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv `op`, or 2x2 average pooling. `[B,H,W,C]` -> `[B,H/2,W/2,C']`."""

    channels: int
    use_conv: bool
    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return _conv(self.out_channels or self.channels, 3, self.dtype, "op", stride=2)(x)
        if (self.out_channels or self.channels) != self.channels:
            raise ValueError("pooling Downsample cannot change the channel count")
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (the seed's ResBlock).

    `x` `[B,H,W,channels]`, `emb` `[B,E]` -> `[B,H',W',out_channels]` (H' = 2H / H/2 with
    `up` / `down`). `use_scale_shift_norm`: emb gives FiLM scale and shift after out norm.
    `dims=3` (the VideoUNet's temporal block): `x` `[B,T,H,W,C]`, `emb` `[B,T,E]`, convs of
    `kernel_size` (e.g. `(3, 1, 1)`: over time only); the seed's `exchange_temb_dims` is
    what broadcasting `emb` over H, W does in channels-last. `skip_t_emb` (the seed's, for the
    video decoder's temporal blocks): no `emb_layers`, `emb` is unused and may be None.
    """

    channels: int
    dropout: float = 0.0
    out_channels: int | None = None
    use_conv: bool = False
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dims: int = 2
    kernel_size: int | Sequence[int] = 3
    skip_t_emb: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array | None) -> jax.Array:
        return self._residual(x, emb)

    def _residual(self, x: jax.Array, emb: jax.Array | None) -> jax.Array:
        """The block's body; VideoResBlock calls it from its own compact `__call__`, so the
        spatial params stay at the top level, as in the seed's subclass."""
        if self.dims == 3 and (self.up or self.down):
            raise NotImplementedError("a 3-d ResBlock does not resample")
        out_ch = self.out_channels or self.channels
        conv = lambda name, kernel=self.kernel_size, **kw: _conv(out_ch, kernel, self.dtype, name, dims=self.dims, **kw)
        h = nn.silu(GroupNorm(dtype=self.dtype, name="in_layers_0")(x))
        if self.up or self.down:
            # Resample both paths between the activation and the conv, as the seed does.
            resample = Upsample if self.up else Downsample
            h = resample(self.channels, False, dtype=self.dtype)(h)
            x = resample(self.channels, False, dtype=self.dtype)(x)
        h = conv("in_layers_2")(h)
        out_norm = GroupNorm(dtype=self.dtype, name="out_layers_0")
        if self.skip_t_emb:
            if self.use_scale_shift_norm:
                raise ValueError("skip_t_emb has no embedding to scale and shift with")
            h = out_norm(h)  # the seed adds zeros in place of the embedding
        else:
            h = self._add_embedding(h, emb, out_ch, out_norm)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
        h = conv("out_layers_3", zero=True)(h)

        if out_ch != self.channels:
            x = conv("skip_connection", self.kernel_size if self.use_conv else 1)(x)
        return x + h

    def _add_embedding(self, h: jax.Array, emb: jax.Array, out_ch: int, out_norm: GroupNorm) -> jax.Array:
        """The embedding's projection added before `out_norm` (or FiLM after it)."""
        emb_width = 2 * out_ch if self.use_scale_shift_norm else out_ch
        emb_out = nn.Dense(emb_width, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        # [B, C] -> [B, 1, 1, C]; [B, T, C] -> [B, T, 1, 1, C]
        spatial_ones = (1,) * (h.ndim - emb_out.ndim)
        emb_out = emb_out.astype(h.dtype).reshape(emb_out.shape[:-1] + spatial_ones + emb_out.shape[-1:])
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            return out_norm(h) * (1 + scale) + shift
        return out_norm(h + emb_out)


# A layer of a TimestepEmbedSequential: (kind, module class, constructor kwargs). `kind`
# says what the layer is called with: "res" (x, emb), "attn" (x, context), "plain" (x).
LayerSpec = tuple[str, type, dict]


class TimestepEmbedSequential(nn.Module):
    """The seed's TimestepEmbedSequential: children named `0`, `1`, ... as in torch.

    `layers` holds specs, not modules, so each child is built here under its torch index.
    """

    layers: Sequence[LayerSpec]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        emb: jax.Array,
        context: Context = None,
        image_only_indicator: jax.Array | None = None,
        time_context: jax.Array | None = None,
    ) -> jax.Array:
        """`image_only_indicator` `[B, T]` and `time_context` reach the VideoUNet's layers
        ("video_res", "video_attn") only, as in the seed's dispatch on the layer type."""
        for i, (kind, cls, kwargs) in enumerate(self.layers):
            if kind == "skip":  # the seed's nn.Identity placeholder keeps later indices
                continue
            layer = cls(**kwargs, name=str(i))
            if kind == "res":
                x = layer(x, emb)
            elif kind == "attn":
                x = layer(x, context)
            elif kind == "video_res":
                x = layer(x, emb, image_only_indicator)
            elif kind == "video_attn":
                x = layer(x, context, time_context, image_only_indicator)
            else:
                x = layer(x)
        return x


class _MLP(nn.Module):
    """Linear (`0`) - SiLU - Linear (`2`), as the seed's embedding Sequentials.

    `[..., D]` -> `[..., out_features or features]` (`features`: the hidden width)."""

    features: int
    dtype: Dtype = jnp.float32
    out_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="0")(x))
        return nn.Dense(self.out_features or self.features, dtype=self.dtype, name="2")(x)


@dataclasses.dataclass
class UNetPlan:
    """Layer specs of every TimestepEmbedSequential, in the seed's order."""

    input_blocks: list[list[LayerSpec]]
    middle_block: list[LayerSpec]
    output_blocks: list[list[LayerSpec]]


class UNetModel(nn.Module):
    """The seed's UNetModel; the constructor takes the seed's keyword names.

    Call: `model.apply({"params": p}, x, timesteps, context=None, y=None, deterministic=True)`
      x: `[B, H, W, in_channels]`; timesteps: `[B]`; context: `[B, S, context_dim]` (or a
      list, one per transformer block depth index); y: `[B]` int labels (int num_classes),
      `[B, adm_in_channels]` ("sequential"), `[B, 1]` ("continuous"), `[B]` ("timestep").
      Dropout needs `rngs={"dropout": key}` when `deterministic=False`.
    Returns `[B, H, W, out_channels]` in `dtype`.

    Accepted for config compatibility and without effect: `dims` (must be 2), `use_fp16`,
    `use_bf16` (use `dtype`), `num_heads_upsample` and `use_new_attention_order` (they only
    concern the legacy AttentionBlock), `use_fairscale_checkpoint`, `offload_to_cpu`.
    `use_spatial_transformer=None` (default) is the current seed: every attention layer is
    a SpatialTransformer; `False` with attention asks for the old AttentionBlock, which
    sgm_jax does not implement. `legacy=True` uses the old `dim_head = ch // num_heads`.
    Beyond the seed: `dtype` (compute dtype; params stay float32), `attn_implementation`
    (sgm_jax.nn.attention.attention's: None, jax's Pallas splash kernel in programs traced for TPUs and
    jax.nn's elsewhere; "xla" / "cudnn" (the fused GPU kernel for bf16) jax.nn's; "tpu"; "splash") and
    `remat_policy`.
    """

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int | Sequence[int]
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | str | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    use_bf16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool | None = None
    transformer_depth: int | Sequence[int] = 1
    context_dim: int | Sequence[int] | None = None
    n_embed: int | None = None
    legacy: bool = False
    disable_self_attentions: Sequence[bool] | None = None
    num_attention_blocks: Sequence[int] | None = None
    disable_middle_self_attn: bool = False
    disable_middle_transformer: bool = False
    use_linear_in_transformer: bool = False
    spatial_transformer_attn_type: str = "softmax"
    adm_in_channels: int | None = None
    use_fairscale_checkpoint: bool = False
    offload_to_cpu: bool = False
    transformer_depth_middle: int | None = None
    attn_implementation: str | None = None  # nn.attention.attention's: None (splash on TPU) / xla / cudnn / tpu / splash
    remat_policy: str | None = None  # with use_checkpoint: what each block keeps (nn.layers.REMAT_POLICIES)
    dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        if self.remat_policy is not None and not self.use_checkpoint:
            raise ValueError(f"remat_policy={self.remat_policy!r} needs use_checkpoint=True (it says what the "
                             "rematerialised blocks keep)")
        if self.dims != 2:
            raise NotImplementedError("sgm_jax's UNetModel supports dims=2 only")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("Either num_heads or num_head_channels has to be set")
        if self.n_embed is not None:
            raise NotImplementedError("n_embed (codebook id prediction) is not supported, as in the seed")
        if self.use_spatial_transformer is False and len(self.attention_resolutions):
            raise NotImplementedError("the legacy AttentionBlock (use_spatial_transformer=False) is not implemented")
        nc = self.num_classes
        if nc is not None and not isinstance(nc, int) and nc not in ("continuous", "timestep", "sequential"):
            raise ValueError(f"unknown num_classes {nc!r}")
        if nc == "sequential" and self.adm_in_channels is None:
            raise ValueError('num_classes="sequential" needs adm_in_channels')
        n_levels = len(self.channel_mult)
        for name in ("disable_self_attentions", "num_attention_blocks"):
            value = getattr(self, name)
            if value is not None and len(value) != n_levels:
                raise ValueError(f"{name} needs one entry per level ({n_levels}), got {list(value)}")

    def _heads(self, ch: int) -> tuple[int, int]:
        """(num_heads, dim_head) of a SpatialTransformer on `ch` channels, as the seed."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // heads
        return heads, dim_head

    def build_plan(self, deterministic: bool = True) -> UNetPlan:
        """The seed's constructor loop: which layers each block holds, with their widths."""
        self._check_config()
        mc, dt = self.model_channels, self.dtype
        mult = [int(m) for m in self.channel_mult]
        n_res = [int(self.num_res_blocks)] * len(mult) if isinstance(self.num_res_blocks, int) \
            else [int(n) for n in self.num_res_blocks]
        if len(n_res) != len(mult):
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        depth = [int(self.transformer_depth)] * len(mult) if isinstance(self.transformer_depth, int) \
            else [int(d) for d in self.transformer_depth]
        depth_middle = depth[-1] if self.transformer_depth_middle is None else int(self.transformer_depth_middle)
        attn_res = {int(r) for r in self.attention_resolutions}
        ctx_dim = self.context_dim if self.context_dim is None or isinstance(self.context_dim, int) \
            else tuple(int(c) for c in self.context_dim)
        res_cls = remat(ResBlock, self.remat_policy) if self.use_checkpoint else ResBlock
        common = dict(deterministic=deterministic, dtype=dt)

        def res(ch: int, out: int, **kw: Any) -> LayerSpec:
            return ("res", res_cls, dict(channels=ch, dropout=self.dropout, out_channels=out,
                                         use_scale_shift_norm=self.use_scale_shift_norm, **kw, **common))

        def attn(ch: int, d: int, disable_sa: bool) -> LayerSpec:
            heads, dim_head = self._heads(ch)
            return ("attn", SpatialTransformer, dict(
                in_channels=ch, n_heads=heads, d_head=dim_head, depth=d, context_dim=ctx_dim,
                disable_self_attn=disable_sa, use_linear=self.use_linear_in_transformer,
                attn_type=self.spatial_transformer_attn_type, use_checkpoint=self.use_checkpoint,
                remat_policy=self.remat_policy, attn_implementation=self.attn_implementation, **common))

        def wants_attn(level: int, index: int) -> bool:
            nab = self.num_attention_blocks
            return nab is None or index < int(nab[level])

        dsa = self.disable_self_attentions
        inputs: list[list[LayerSpec]] = [[("plain", nn.Conv, dict(
            features=mc, kernel_size=(3, 3), padding=_PAD1, dtype=dt))]]
        chans, ch, ds = [mc], mc, 1
        for level, m in enumerate(mult):
            for nr in range(n_res[level]):
                layers = [res(ch, m * mc)]
                ch = m * mc
                if ds in attn_res and wants_attn(level, nr):
                    # The seed reads disable_self_attentions here only when context_dim is set.
                    disable = bool(dsa[level]) if (ctx_dim is not None and dsa is not None) else False
                    layers.append(attn(ch, depth[level], disable))
                inputs.append(layers)
                chans.append(ch)
            if level != len(mult) - 1:
                inputs.append([res(ch, ch, down=True) if self.resblock_updown else
                               ("plain", Downsample, dict(channels=ch, use_conv=self.conv_resample, dtype=dt))])
                chans.append(ch)
                ds *= 2

        middle_attn = ("skip", None, {}) if self.disable_middle_transformer \
            else attn(ch, depth_middle, self.disable_middle_self_attn)
        middle = [res(ch, ch), middle_attn, res(ch, ch)]

        outputs: list[list[LayerSpec]] = []
        for level, m in reversed(list(enumerate(mult))):
            for i in range(n_res[level] + 1):
                layers = [res(ch + chans.pop(), mc * m)]
                ch = mc * m
                if ds in attn_res and wants_attn(level, i):
                    layers.append(attn(ch, depth[level], bool(dsa[level]) if dsa is not None else False))
                if level and i == n_res[level]:
                    layers.append(res(ch, ch, up=True) if self.resblock_updown else
                                  ("plain", Upsample, dict(channels=ch, use_conv=self.conv_resample, dtype=dt)))
                    ds //= 2
                outputs.append(layers)
        return UNetPlan(inputs, middle, outputs)

    def example_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Any]:
        """Smallest valid inputs (zeros) for `init` / `jax.eval_shape`, as keyword arguments.

        `size` defaults to the smallest spatial size every level can halve.
        """
        self._check_config()
        size = size or 2 ** (len(self.channel_mult) - 1)
        out: dict[str, Any] = {
            "x": jnp.zeros((batch, size, size, self.in_channels), jnp.float32),
            "timesteps": jnp.zeros((batch,), jnp.float32),
        }
        if self.context_dim is not None:
            dims = [self.context_dim] if isinstance(self.context_dim, int) else [int(c) for c in self.context_dim]
            ctx = [jnp.zeros((batch, 1, d), jnp.float32) for d in dims]
            out["context"] = ctx[0] if all(d == dims[0] for d in dims) else ctx
        if isinstance(self.num_classes, int):
            out["y"] = jnp.zeros((batch,), jnp.int32)
        elif self.num_classes == "continuous":
            out["y"] = jnp.zeros((batch, 1), jnp.float32)
        elif self.num_classes == "timestep":
            out["y"] = jnp.zeros((batch,), jnp.float32)
        elif self.num_classes == "sequential":
            out["y"] = jnp.zeros((batch, int(self.adm_in_channels)), jnp.float32)
        return out

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: Context = None,
        y: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        return self._unet(x, timesteps, context, y, deterministic)

    def _unet(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: Context,
        y: jax.Array | None,
        deterministic: bool,
        image_only_indicator: jax.Array | None = None,
        time_context: jax.Array | None = None,
    ) -> jax.Array:
        """The forward pass; VideoUNet's `__call__` adds `image_only_indicator` `[B, T]` and
        `time_context`, which every block passes on to its video layers."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional")
        plan = self.build_plan(deterministic)
        dt = self.dtype
        ted = self.model_channels * 4
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = _MLP(ted, dtype=dt, name="time_embed")(t_emb)
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch {y.shape[0]}, x has {x.shape[0]}")
            emb = emb + self._label_embedding(y, ted)

        # Cast the context once: the attention projections compute in `dtype` anyway.
        if isinstance(context, (list, tuple)):
            context = [c.astype(dt) for c in context]
        elif context is not None:
            context = context.astype(dt)
        video = dict(image_only_indicator=image_only_indicator,
                     time_context=None if time_context is None else time_context.astype(dt))
        h = x.astype(dt)
        hs = []
        for i, layers in enumerate(plan.input_blocks):
            h = TimestepEmbedSequential(layers, name=f"input_blocks_{i}")(h, emb, context, **video)
            hs.append(h)
        h = TimestepEmbedSequential(plan.middle_block, name="middle_block")(h, emb, context, **video)
        for i, layers in enumerate(plan.output_blocks):
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = TimestepEmbedSequential(layers, name=f"output_blocks_{i}")(h, emb, context, **video)
        h = nn.silu(GroupNorm(dtype=dt, name="out_0")(h))
        return _conv(self.out_channels, 3, dt, "out_2", zero=True)(h)

    def _label_embedding(self, y: jax.Array, ted: int) -> jax.Array:
        """`label_emb` for each `num_classes` mode; returns `[B, ted]`."""
        dt = self.dtype
        if isinstance(self.num_classes, int):
            return nn.Embed(self.num_classes, ted, dtype=dt, name="label_emb")(y)
        if self.num_classes == "continuous":
            return nn.Dense(ted, dtype=dt, name="label_emb")(y.astype(dt))
        if self.num_classes == "timestep":
            return _MLP(ted, dtype=dt, name="label_emb_1")(timestep_embedding(y, self.model_channels))
        # "sequential": Sequential(Sequential(Linear, SiLU, Linear)) -> label_emb.0.{0,2}
        return _MLP(ted, dtype=dt, name="label_emb_0")(y.astype(dt))
