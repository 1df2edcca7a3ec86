"""The seed's first stage: AutoencoderKL (Encoder, Decoder, diagonal Gaussian) in Flax linen.

Mirrors `sgm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample), `sgm/models/autoencoder.py` (AutoencodingEngineLegacy: quant_conv,
post_quant_conv) and `sgm/modules/distributions/distributions.py`.

Images and latents are NHWC. Module names follow the seed's state-dict names with `.`
written as `_` where a list index is involved (`down_1_block_0` is the seed's
`down.1.block.0`, `mid_attn_1` is `mid.attn_1`); `sgm_jax.convert.vae` turns them back.
The latent scale factor (0.13025 SDXL, 0.18215 SD 2.x) is applied by callers, as in the
seed's DiffusionEngine.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
from flax.core import FrozenDict
import jax
import jax.numpy as jnp

from sgm_jax.nn.attention import attention
from sgm_jax.nn.layers import GroupNorm

Dtype = Any

# The seed's attention types that hold q/k/v/proj_out; "vanilla-xformers" computes the same
# thing as "vanilla" (jax.nn.dot_product_attention picks the kernel here).
_ATTN_TYPES_WITH_PARAMS = ("vanilla", "vanilla-xformers")


def _norm(name: str) -> GroupNorm:
    # The seed's Normalize: 32 groups, eps 1e-6; GroupNorm computes in float32.
    return GroupNorm(num_groups=32, epsilon=1e-6, name=name)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    pad = ((kernel // 2, kernel // 2),) * 2 if padding == "SAME" else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-dropout-conv2 + (1x1 nin_shortcut when channels change).

    `x` `[B, H, W, Cin]` -> `[B, H, W, out_channels]`. No timestep input (temb_channels=0).
    """

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return self._residual(x, deterministic)

    def _residual(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """The block's body; the video decoder's VideoResBlock calls it from its own compact
        `__call__`, so the spatial params stay at the block's level, as in the seed's subclass."""
        h = nn.swish(_norm("norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.swish(_norm("norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v, proj_out (residual).

    `x` `[B, H, W, C]` -> same shape. Attention over the H*W positions, scale C^-0.5.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(x.shape[-1], 1, "proj_out", self.dtype)(self._attend(x))
        return x.astype(h.dtype) + h

    def _attend(self, x: jax.Array) -> jax.Array:
        """norm, q/k/v and the attention, `[B, H, W, C]` before proj_out (the seed's
        `attention`; its VideoBlock mixes over time between this and proj_out)."""
        b, hgt, wid, c = x.shape
        h = _norm("norm")(x)
        # [B, H*W, 1 head, C]: the layout jax.nn.dot_product_attention expects.
        q, k, v = (_conv(c, 1, n, self.dtype)(h).reshape(b, hgt * wid, 1, c) for n in ("q", "k", "v"))
        return attention(q, k, v).reshape(b, hgt, wid, c)  # in query chunks past its logit budget


class Downsample(nn.Module):
    """Stride-2 3x3 conv after the seed's asymmetric zero pad (0 before, 1 after, on H and W)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (each pixel repeated 2x2, as torch's interpolate) then 3x3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


def _make_attn(attn_type: str, name: str, dtype: Dtype):
    if attn_type in _ATTN_TYPES_WITH_PARAMS:
        return AttnBlock(dtype=dtype, name=name)
    if attn_type == "none":
        return lambda h: h
    raise NotImplementedError(f"attn_type {attn_type!r} is not supported (use 'vanilla')")


class Encoder(nn.Module):
    """Image `[B, H, W, in_channels]` -> `[B, H/f, W/f, (2 if double_z else 1) * z_channels]`,
    f = 2 ** (len(ch_mult) - 1)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    double_z: bool = True
    dropout: float = 0.0
    attn_type: str = "vanilla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = _conv(self.ch, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        curr_res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, self.dtype, name=f"down_{i}_block_{j}")(h, deterministic)
                if curr_res in self.attn_resolutions:
                    h = _make_attn(self.attn_type, f"down_{i}_attn_{j}", self.dtype)(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                curr_res //= 2
        h = ResnetBlock(h.shape[-1], self.dropout, self.dtype, name="mid_block_1")(h, deterministic)
        h = _make_attn(self.attn_type, "mid_attn_1", self.dtype)(h)
        h = ResnetBlock(h.shape[-1], self.dropout, self.dtype, name="mid_block_2")(h, deterministic)
        h = nn.swish(_norm("norm_out")(h))
        out_ch = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv(out_ch, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    """Latent `[B, h, w, z_channels]` -> image `[B, h*f, w*f, out_ch]`.

    Its res blocks, attention and conv_out are built by `_resnet`, `_attn` and `_conv_out`
    (the seed's `_make_resblock`, `_make_attn`, `_make_conv`), which the video decoder
    (`sgm_jax.nn.video_vae.VideoDecoder`) overrides. `timesteps` (frames per video) is passed
    to them; this image decoder ignores it, as the seed's blocks ignore their `**kwargs`.
    """

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    dropout: float = 0.0
    attn_type: str = "vanilla"
    give_pre_end: bool = False
    tanh_out: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, timesteps: int | None = None) -> jax.Array:
        levels = len(self.ch_mult)
        block_in = self.ch * self.ch_mult[-1]
        curr_res = self.resolution // 2 ** (levels - 1)
        h = _conv(block_in, 3, "conv_in", self.dtype)(z.astype(self.dtype))
        h = self._resnet(h, block_in, "mid_block_1", deterministic, timesteps)
        h = self._attn(h, "mid_attn_1", timesteps)
        h = self._resnet(h, block_in, "mid_block_2", deterministic, timesteps)
        # The seed stores the up path by level index (up.0 = full resolution) and runs it
        # from the lowest resolution upwards.
        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                h = self._resnet(h, self.ch * self.ch_mult[i], f"up_{i}_block_{j}", deterministic, timesteps)
                if curr_res in self.attn_resolutions:
                    h = self._attn(h, f"up_{i}_attn_{j}", timesteps)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
                curr_res *= 2
        if self.give_pre_end:
            return h
        h = nn.swish(_norm("norm_out")(h))
        # The input of the last layer, kept only when "intermediates" is mutable: the
        # autoencoder's adaptive GAN weight needs gradients at conv_out (get_last_layer).
        self.sow("intermediates", "conv_out_input", h)
        h = self._conv_out(h, timesteps)
        return jnp.tanh(h) if self.tanh_out else h

    @staticmethod
    def config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """This class's own keyword arguments from a seed decoder config (a subclass's extras)."""
        return {}

    def _resnet(self, h: jax.Array, out_channels: int, name: str, deterministic: bool,
                timesteps: int | None) -> jax.Array:
        return ResnetBlock(out_channels, self.dropout, self.dtype, name=name)(h, deterministic)

    def _attn(self, h: jax.Array, name: str, timesteps: int | None) -> jax.Array:
        return _make_attn(self.attn_type, name, self.dtype)(h)

    def _conv_out(self, h: jax.Array, timesteps: int | None) -> jax.Array:
        return _conv(self.out_ch, 3, "conv_out", self.dtype)(h)


# The seed's decoder class names -> their Flax modules. Subclasses defined elsewhere register
# here (sgm_jax.nn.video_vae's VideoDecoder, imported with sgm_jax.nn), so this module needs
# no import of theirs.
DECODERS: dict[str, type[Decoder]] = {"Decoder": Decoder}


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    """Class decorator: make `cls` buildable as AutoencoderKL(decoder_target=cls.__name__)."""
    DECODERS[cls.__name__] = cls
    return cls


@flax.struct.dataclass
class DiagonalGaussianDistribution:
    """The seed's DiagonalGaussianDistribution over NHWC moments (a pytree, jit-friendly).

    Build with `DiagonalGaussianDistribution.from_moments(moments)`, moments
    `[B, h, w, 2*C]` = concat(mean, logvar) on the channel axis; logvar is clamped to
    [-30, 20] as in the seed.
    """

    mean: jax.Array
    logvar: jax.Array
    deterministic: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_moments(cls, moments: jax.Array, deterministic: bool = False) -> "DiagonalGaussianDistribution":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0), deterministic)

    @property
    def std(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.zeros_like(self.mean) if self.deterministic else jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * N(0, 1), `[B, h, w, C]`."""
        noise = jax.random.normal(key, self.mean.shape, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> jax.Array:
        """KL(self || other) (other = N(0, 1) when None), summed per sample: `[B]`."""
        if self.deterministic:
            return jnp.zeros((self.mean.shape[0],), self.mean.dtype)
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample: jax.Array, axis: tuple[int, ...] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of `sample`, summed over `axis`."""
        if self.deterministic:
            return jnp.zeros((self.mean.shape[0],), self.mean.dtype)
        log_two_pi = jnp.log(2.0 * jnp.pi)
        return 0.5 * jnp.sum(log_two_pi + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axis)


def normalize_ddconfig(ddconfig: Any) -> dict[str, Any]:
    """Plain dict from a dict / FrozenDict / ml_collections.ConfigDict; lists become tuples
    (the seed's YAML configs give lists, Python configs often tuples)."""
    items = ddconfig.items() if hasattr(ddconfig, "items") else dict(ddconfig).items()
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in items}


def _common_args(cfg: Mapping[str, Any], dtype: Dtype) -> dict[str, Any]:
    """Encoder / Decoder keyword arguments shared by both, from the seed's ddconfig."""
    attn_type = "linear" if cfg.get("use_linear_attn", False) else cfg.get("attn_type", "vanilla")
    return dict(
        ch=int(cfg["ch"]),
        ch_mult=tuple(int(m) for m in cfg.get("ch_mult", (1, 2, 4, 8))),
        num_res_blocks=int(cfg["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in cfg.get("attn_resolutions", ())),
        resolution=int(cfg["resolution"]),
        z_channels=int(cfg["z_channels"]),
        dropout=float(cfg.get("dropout", 0.0)),
        attn_type=attn_type,
        dtype=dtype,
    )


class AutoencoderKL(nn.Module):
    """The seed's AutoencoderKL (AutoencodingEngineLegacy with a DiagonalGaussianRegularizer),
    and its AutoencodingEngine (`use_quant_conv=False`, `decoder_config` = the decoder's params
    when they differ from the encoder's `ddconfig`); build either with `autoencoder_from_config`.
    `decoder_target` "VideoDecoder": the decoder is `sgm_jax.nn.video_vae.VideoDecoder` (SVD's
    first stage); `decode`'s `timesteps` is then the number of frames per video.

    Params (float32): `encoder`, `decoder`, `quant_conv`, `post_quant_conv` (the last two only
    with `use_quant_conv`). Compute dtype `dtype`; group norms run in float32. Usage:
      moments = model.apply({"params": p}, x, method=AutoencoderKL.encode)  # [B,h,w,2*embed_dim]
      z = DiagonalGaussianDistribution.from_moments(moments).sample(key)  # or .mode()
      x_rec = model.apply({"params": p}, z, method=AutoencoderKL.decode)  # [B,H,W,out_ch]
    `x` is NHWC in [-1, 1]; `z` is the unscaled latent (callers multiply by scale_factor).
    """

    embed_dim: int
    ddconfig: Any
    dtype: Dtype = jnp.float32
    decoder_config: Any = None  # None: the decoder reads `ddconfig` too (AutoencoderKL)
    use_quant_conv: bool = True  # False: the AutoencodingEngine (no quant_conv / post_quant_conv)
    decoder_target: str = "Decoder"  # or "VideoDecoder" (the seed's temporal_ae.VideoDecoder)

    def __post_init__(self) -> None:
        # A hashable copy (FrozenDict, tuples) keeps the module usable as a static jit argument.
        object.__setattr__(self, "ddconfig", FrozenDict(normalize_ddconfig(self.ddconfig)))
        if self.decoder_config is not None:
            object.__setattr__(self, "decoder_config", FrozenDict(normalize_ddconfig(self.decoder_config)))
        super().__post_init__()

    def setup(self) -> None:
        enc, dec = _common_args(self.ddconfig, self.dtype), _common_args(self.decoder_config or self.ddconfig, self.dtype)
        self.double_z = bool(self.ddconfig.get("double_z", True))
        self.encoder = Encoder(double_z=self.double_z, **enc)
        dec_cfg = self.decoder_config or self.ddconfig
        decoder_cls = DECODERS.get(self.decoder_target)
        if decoder_cls is None:
            raise ValueError(f"decoder_target {self.decoder_target!r} is not one of {sorted(DECODERS)}")
        self.decoder = decoder_cls(
            out_ch=int(dec_cfg["out_ch"]),
            give_pre_end=bool(dec_cfg.get("give_pre_end", False)),
            tanh_out=bool(dec_cfg.get("tanh_out", False)),
            **dec,
            **decoder_cls.config_kwargs(dec_cfg),
        )
        if self.use_quant_conv:
            moments = (1 + self.double_z) * self.embed_dim
            self.quant_conv = nn.Conv(moments, (1, 1), dtype=self.dtype, name="quant_conv")
            self.post_quant_conv = nn.Conv(dec["z_channels"], (1, 1), dtype=self.dtype, name="post_quant_conv")

    def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Image `[B, H, W, in_channels]` -> moments `[B, H/f, W/f, 2*embed_dim]` (mean, logvar)."""
        h = self.encoder(x, deterministic)
        return self.quant_conv(h) if self.use_quant_conv else h

    def encode_posterior(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussianDistribution:
        """Image -> the posterior over latents (logvar clamped)."""
        return DiagonalGaussianDistribution.from_moments(self.encode(x, deterministic))

    def decode(self, z: jax.Array, deterministic: bool = True, timesteps: int | None = None) -> jax.Array:
        """Latent `[B, h, w, embed_dim]` (unscaled) -> image `[B, h*f, w*f, out_ch]`.

        `timesteps`: frames per video for a VideoDecoder (B = videos * timesteps, video-major;
        None: all B latents are one clip, as the seed decodes each `decoding_t` chunk); the
        image decoder ignores it."""
        z = z.astype(self.dtype)
        return self.decoder(self.post_quant_conv(z) if self.use_quant_conv else z, deterministic, timesteps)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, DiagonalGaussianDistribution]:
        """Reconstruct: returns (z, decoded, posterior); z is sampled when `key` is given,
        else the posterior mode (the seed's DiagonalGaussianRegularizer(sample=...))."""
        posterior = self.encode_posterior(x, deterministic)
        z = posterior.mode() if key is None else posterior.sample(key)
        return z, self.decode(z, deterministic), posterior


# The seed's first-stage classes whose weights are an Encoder / Decoder pair (+ quant convs).
LEGACY_TARGETS = ("AutoencoderKL", "AutoencodingEngineLegacy", "AutoencoderKLModeOnly")
ENGINE_TARGETS = ("AutoencodingEngine",)


def autoencoder_from_config(first_stage_config: Mapping[str, Any], dtype: Dtype = jnp.float32) -> AutoencoderKL:
    """The Flax module for a seed first-stage config `{"target": ..., "params": {...}}`:
    AutoencoderKL / AutoencodingEngineLegacy (`embed_dim`, `ddconfig`: with quant convs) or
    AutoencodingEngine (`encoder_config`, `decoder_config`: no quant convs; the latent has
    z_channels channels). Other targets raise ValueError."""
    target = str(first_stage_config.get("target", "")).rsplit(".", 1)[-1]
    params = first_stage_config.get("params", {}) or {}
    if target in LEGACY_TARGETS:
        return AutoencoderKL(embed_dim=int(params["embed_dim"]), ddconfig=params["ddconfig"], dtype=dtype)
    if target in ENGINE_TARGETS:
        enc = dict(params["encoder_config"].get("params", {}))
        dec = dict(params["decoder_config"].get("params", {}))
        reg = str((params.get("regularizer_config") or {}).get("target", "DiagonalGaussianRegularizer"))
        if not reg.endswith("DiagonalGaussianRegularizer"):
            raise ValueError(f"regularizer {reg!r} is not supported; sgm_jax implements DiagonalGaussianRegularizer")
        targets = {name: str(params[name].get("target", "")).rsplit(".", 1)[-1]
                   for name in ("encoder_config", "decoder_config")}
        for name, allowed in (("encoder_config", ("Encoder", "")), ("decoder_config", (*DECODERS, ""))):
            if targets[name] not in allowed:
                raise ValueError(f"{name} target {params[name]['target']!r} is not supported "
                                 f"(use the seed's {' / '.join(a for a in allowed if a)})")
        return AutoencoderKL(embed_dim=int(enc["z_channels"]), ddconfig=enc,
                             decoder_config=None if normalize_ddconfig(dec) == normalize_ddconfig(enc) else dec,
                             use_quant_conv=False, decoder_target=targets["decoder_config"] or "Decoder", dtype=dtype)
    raise ValueError(f"first stage {first_stage_config.get('target')!r} is not an autoencoder sgm_jax implements "
                     f"({', '.join(LEGACY_TARGETS + ENGINE_TARGETS)})")
