"""Guiders: how the conditional and unconditional predictions are combined, as the seed.

`prepare_inputs(x, sigma, cond, uc)` builds the network batch; `guider(denoised, sigma)`
combines its outputs. VanillaCFG doubles the batch ([uc; c]) exactly as the seed does.

The video guiders (LinearPredictionGuider, TrianglePredictionGuider; Stable Video Diffusion)
double the batch the same way but give every frame its own scale: the batch is
`[B*T, ...]` with the T = num_frames frames of each video folded into it (video-major), and
frame t of every video gets scale[t] of a [T] ramp between min_scale and max_scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from .denoiser import append_dims

Cond = Mapping[str, Any]
# stacked [uc; c] by every guider; image_only_indicator [B, T] (a VideoUNet's frames, video-major)
# doubles with the batch, as the seed's sampling script doubles it by hand (zeros(2, T))
BATCHED_COND_KEYS = ("vector", "crossattn", "concat", "image_only_indicator")


@dataclass(frozen=True)
class IdentityGuider:
    needs_uc = False

    def prepare_inputs(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: Cond, uc: Cond | None):
        return x, sigma, dict(cond)

    def __call__(self, denoised: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        return denoised


@dataclass(frozen=True)
class NoDynamicThresholding:
    def __call__(self, uncond: jnp.ndarray, cond: jnp.ndarray, scale: float) -> jnp.ndarray:
        return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class DynamicThresholding:
    """Imagen-style dynamic thresholding of the guided x0 prediction.

    Per example, s = max(quantile(|x0|, percentile), 1); x0 is clipped to [-s, s] and divided
    by s, which keeps high CFG scales from saturating (pixel-space models).
    """

    percentile: float = 0.995

    def __call__(self, uncond: jnp.ndarray, cond: jnp.ndarray, scale: float) -> jnp.ndarray:
        x0 = uncond + scale * (cond - uncond)
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, self.percentile, axis=1), 1.0)
        s = append_dims(s, x0.ndim)
        return jnp.clip(x0, -s, s) / s


@dataclass(frozen=True)
class VanillaCFG:
    """Classifier-free guidance: D = D_u + scale * (D_c - D_u)."""

    scale: float
    dyn_thresh: Any = NoDynamicThresholding()
    needs_uc = True

    def prepare_inputs(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: Cond, uc: Cond | None):
        if uc is None:
            raise ValueError("VanillaCFG needs an unconditional conditioning: pass uc=... to the sampler")
        merged = {}
        for k, v in cond.items():
            if k in BATCHED_COND_KEYS:
                if k not in uc:
                    raise ValueError(f"uc lacks the conditioning key {k!r} that cond has")
                merged[k] = jnp.concatenate([uc[k], v], axis=0)
            else:
                merged[k] = v  # the seed asserts these are equal in cond and uc
        return jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), merged

    def __call__(self, denoised: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        x_u, x_c = jnp.split(denoised, 2, axis=0)
        return self.dyn_thresh(x_u, x_c, self.scale)


def _key_tuple(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """The seed's additional_cond_keys: None, one key or a list -> a (hashable) tuple."""
    if keys is None:
        return ()
    return (keys,) if isinstance(keys, str) else tuple(keys)


class _FrameRampGuider:
    """What the seed's LinearPredictionGuider and its subclasses share: the batch doubling
    of prepare_inputs and the per-frame combination. Subclasses define `frame_scales()` [T].

    A mixin without dataclass fields, so that each guider declares its fields in the seed's
    constructor order (dataclass inheritance would append the subclass's after the base's).
    """

    num_frames: int
    additional_cond_keys: tuple[str, ...]
    needs_uc = True

    def _check(self) -> None:
        object.__setattr__(self, "additional_cond_keys", _key_tuple(self.additional_cond_keys))
        if int(self.num_frames) != self.num_frames or self.num_frames < 1:
            raise ValueError(f"{type(self).__name__}: num_frames must be a positive int, got {self.num_frames!r}")

    def frame_scales(self) -> jnp.ndarray:
        raise NotImplementedError  # abstract: each guider's ramp

    def prepare_inputs(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: Cond, uc: Cond | None):
        """x [B*T, ...], sigma [B*T] -> ([uc; c] batch of 2*B*T). Besides vector / crossattn /
        concat, the additional_cond_keys (e.g. image_only_indicator [B, T], cond_view) are
        stacked [uc; c] along axis 0; every other key is passed through from cond, unchecked
        (the seed comments its equality assert out here)."""
        name = type(self).__name__
        if uc is None:
            raise ValueError(f"{name} needs an unconditional conditioning: pass uc=... to the sampler")
        batched = BATCHED_COND_KEYS + self.additional_cond_keys
        merged = {}
        for k, v in cond.items():
            if k not in batched:
                merged[k] = v
                continue
            if k not in uc:
                raise ValueError(f"uc lacks the conditioning key {k!r} that cond has")
            if jnp.ndim(v) == 0 or jnp.ndim(uc[k]) == 0:
                # a scalar (e.g. num_video_frames) has no batch axis to stack uc and c along
                raise ValueError(f"{name}: additional cond key {k!r} is a scalar; only arrays can be batched")
            merged[k] = jnp.concatenate([jnp.asarray(uc[k]), jnp.asarray(v)], axis=0)
        return jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), merged

    def __call__(self, denoised: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        """denoised [2*B*T, ...] ([uc; c]) -> [B*T, ...]: D_u + scale[t] * (D_c - D_u) per frame t."""
        x_u, x_c = jnp.split(denoised, 2, axis=0)
        t = int(self.num_frames)
        if x_u.shape[0] % t:
            raise ValueError(f"{type(self).__name__}: batch {x_u.shape[0]} is not a whole number of "
                             f"{t}-frame videos")
        videos = (x_u.shape[0] // t, t) + x_u.shape[1:]
        # Cast to the prediction's dtype: the sampler's lax.scan carry must keep its dtype
        # (the seed's float32 scale would promote a half-precision x).
        scale = append_dims(self.frame_scales().astype(x_u.dtype)[None], len(videos))
        x_u, x_c = x_u.reshape(videos), x_c.reshape(videos)
        return (x_u + scale * (x_c - x_u)).reshape((-1,) + videos[2:])


@dataclass(frozen=True)
class LinearPredictionGuider(_FrameRampGuider):
    """Per-frame CFG, the scale rising linearly over the video: scale[t] = linspace(min_scale,
    max_scale, num_frames)[t] (SVD's default guider: 1.0 on the conditioning frame, max_scale on
    the last). max_scale may be a tracer, as VanillaCFG's scale."""

    max_scale: float
    num_frames: int
    min_scale: float = 1.0
    additional_cond_keys: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self._check()

    def frame_scales(self) -> jnp.ndarray:
        """[num_frames] float32."""
        return jnp.linspace(self.min_scale, self.max_scale, int(self.num_frames), dtype=jnp.float32)


PERIOD_FUSINGS = ("mean", "multiply", "max")


def triangle_wave(values: np.ndarray, period: float) -> np.ndarray:
    """The seed's triangle wave 2 |v/p - round(v/p)| (round half up): 0 at multiples of the
    period, 1 half-way between; values [T] -> [T]."""
    v = values / np.float32(period)
    return 2 * np.abs(v - np.floor(v + np.float32(0.5)))


@dataclass(frozen=True)
class TrianglePredictionGuider(_FrameRampGuider):
    """Per-frame CFG following a triangle wave over the video's normalised time u = linspace(0, 1, T):
    w(u) = fuse_p triangle_wave(u, p) over the periods p, scale[t] = min_scale + w * (max_scale -
    min_scale). period 1.0 (the default) rises from min_scale at frame 0 to max_scale mid-video and
    back. period_fusing combines several periods: "mean", "multiply" (product) or "max".

    The seed takes one float or a list for `period` (an int such as a yaml `period: 1` would
    crash it); here any number or sequence of numbers."""

    max_scale: float
    num_frames: int
    min_scale: float = 1.0
    period: float | Sequence[float] = 1.0
    period_fusing: str = "max"
    additional_cond_keys: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self._check()
        periods = (self.period,) if np.ndim(self.period) == 0 else tuple(self.period)
        if not periods:
            raise ValueError("TrianglePredictionGuider: period needs at least one value")
        object.__setattr__(self, "period", tuple(float(p) for p in periods))
        if self.period_fusing not in PERIOD_FUSINGS:
            raise ValueError(f"period_fusing {self.period_fusing!r} not in {PERIOD_FUSINGS}")

    def frame_weights(self) -> np.ndarray:
        """[num_frames] float32 in [0, 1]: the fused triangle waves (host constants, in float32 as
        the seed's torch.linspace values)."""
        values = np.linspace(0.0, 1.0, int(self.num_frames)).astype(np.float32)
        waves = np.stack([triangle_wave(values, p) for p in self.period])
        fuse = {"mean": lambda w: w.sum(0) / len(self.period), "multiply": lambda w: w.prod(0),
                "max": lambda w: w.max(0)}[self.period_fusing]
        return fuse(waves).astype(np.float32)

    def frame_scales(self) -> jnp.ndarray:
        """[num_frames] float32."""
        w = jnp.asarray(self.frame_weights())
        return w * (self.max_scale - self.min_scale) + self.min_scale
