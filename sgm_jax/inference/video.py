"""Image to video with Stable Video Diffusion (SVD, SVD-XT), as the seed's
scripts/sampling/simple_video_sample.py:

    frames = sample_video(pipeline, load_image("in.png"), num_frames=25, fps_id=6,
                          motion_bucket_id=127, cond_aug=0.02, seed=23)   # uint8 [25, H, W, 3]

The conditioning frame (and a copy noised by cond_aug) goes through the conditioner once
(OpenCLIP image embedding -> crossattn, VAE latents -> concat, fps / motion / cond_aug ->
vector per frame); the unconditional input zeroes both image embeddings; crossattn and concat
are repeated over the frames, folded into the batch `[T, ...]`; the sampler's per-frame guider
doubles every input [uc; c], image_only_indicator included; the VAE's VideoDecoder decodes in
chunks of decoding_t frames. One jitted function, compiled once per (spec, frames, size).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.engine import DiffusionEngine
from sgm_jax.errors import UserError
from sgm_jax.images import to_uint8
from sgm_jax.nn.video_unet import VideoUNet
from sgm_jax.sampling_defaults import SamplingDefaults

from .pipeline import Pipeline
from .sampling import SamplerSpec, seed_key

IMAGE_KEYS = ("cond_frames_without_noise", "cond_frames")  # zeroed in the unconditional input (the seed's)
PER_FRAME_KEYS = ("fps_id", "motion_bucket_id", "cond_aug")
REPEATED_OUTPUTS = ("crossattn", "concat")  # one per video from the conditioner, repeated per frame


def is_video_model(engine: DiffusionEngine) -> bool:
    return isinstance(engine.network, VideoUNet)


def is_video_config(config: Any) -> bool:
    """Whether a config's network is the seed's VideoUNet (read from the config, nothing built)."""
    model = config["model"]
    params = model.get("params", model)
    return str((params.get("network_config") or {}).get("target", "")).endswith("VideoUNet")


def video_spec(pipeline: Pipeline, num_frames: int, steps: int | None = None, **options: Any) -> SamplerSpec:
    """The model's sampler spec, guided, its per-frame guider sized to num_frames (the seed's load_model
    sets guider_config.params.num_frames the same way)."""
    spec = pipeline.spec(steps=steps, guided=True, **options)  # the image conditions it, not a prompt or class
    guider_options = dict(spec.guider_options)
    if "num_frames" in guider_options:
        guider_options["num_frames"] = int(num_frames)
    return dataclasses.replace(spec, guider_options=tuple(sorted(guider_options.items())))


def video_conditioning(engine: DiffusionEngine, params: Any, image: jax.Array, cond_noise: jax.Array,
                       num_frames: int, fps_id: jax.Array, motion_bucket_id: jax.Array, cond_aug: jax.Array
                       ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(c, uc) per frame, as simple_video_sample.py builds them: image `[1, H, W, 3]` in [-1, 1],
    cond_noise like it (the frame encoder sees image + cond_aug * cond_noise) -> crossattn
    `[T, 1, D]`, vector `[T, adm]`, concat `[T, H/8, W/8, 4]`, image_only_indicator `[1, T]`."""
    t = num_frames
    batch = {"cond_frames_without_noise": image, "cond_frames": image + cond_aug * cond_noise,
             "fps_id": jnp.full((t,), fps_id, jnp.float32),
             "motion_bucket_id": jnp.full((t,), motion_bucket_id, jnp.float32),
             "cond_aug": jnp.full((t,), cond_aug, jnp.float32)}
    c = engine.condition(params, batch)
    uc = engine.condition(params, batch, force_zero_embeddings=IMAGE_KEYS)

    def per_frame(cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = {k: jnp.repeat(v, t, axis=0) if k in REPEATED_OUTPUTS else v for k, v in cond.items()}
        return {**out, "image_only_indicator": jnp.zeros((1, t))}

    return per_frame(c), per_frame(uc)


def video_from_noise(engine: DiffusionEngine, spec: SamplerSpec, params: Any, image: jax.Array,
                     cond_noise: jax.Array, noise: jax.Array, scale: jax.Array, fps_id: jax.Array,
                     motion_bucket_id: jax.Array, cond_aug: jax.Array, key: jax.Array,
                     decoding_t: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The whole image-to-video computation from its random inputs: noise `[T, H/8, W/8, 4]` (the
    seed's randn) -> (latents `[T, H/8, W/8, 4]`, decoded frames `[T, H, W, 3]`, unclamped)."""
    c, uc = video_conditioning(engine, params, image, cond_noise, noise.shape[0], fps_id, motion_bucket_id,
                               cond_aug)
    z = spec.build(scale)(lambda x, s, cond: engine.denoise(params, x, s, cond), noise, c, uc=uc, key=key)
    decoder = dataclasses.replace(engine, en_and_decode_n_samples_a_time=decoding_t)
    return z, decoder.decode_first_stage(params, z)


@functools.partial(jax.jit, static_argnames=("engine", "spec", "num_frames", "decoding_t"))
def _sample(engine: DiffusionEngine, spec: SamplerSpec, params: Any, image: jax.Array, key: jax.Array,
            scale: jax.Array, fps_id: jax.Array, motion_bucket_id: jax.Array, cond_aug: jax.Array,
            num_frames: int, decoding_t: int | None) -> jax.Array:
    aug_key, noise_key, sampler_key = jax.random.split(key, 3)
    h, w = image.shape[1:3]
    f = engine.first_stage_factor
    noise = jax.random.normal(noise_key, (num_frames, h // f, w // f, int(engine.first_stage.embed_dim)),
                              jnp.float32)
    cond_noise = jax.random.normal(aug_key, image.shape, image.dtype)
    _, frames = video_from_noise(engine, spec, params, image, cond_noise, noise, scale, fps_id, motion_bucket_id,
                                 cond_aug, sampler_key, decoding_t)
    return to_uint8(frames)


def sample_video(pipeline: Pipeline, image: np.ndarray, *, num_frames: int, fps_id: int, motion_bucket_id: int,
                 cond_aug: float, seed: int, spec: SamplerSpec | None = None, cfg_scale: float | None = None,
                 decoding_t: int | None = None) -> np.ndarray:
    """image: [1, H, W, 3] in [-1, 1] (load_image) -> uint8 frames [num_frames, H, W, 3]."""
    engine = pipeline.engine
    if not is_video_model(engine):
        raise UserError(f"{pipeline.name} is not a video model (its network is not a VideoUNet)")
    if int(num_frames) < 1:
        raise UserError(f"--num-frames must be >= 1, got {num_frames}")
    image = np.asarray(image, np.float32)
    pipeline.check_size(image.shape[2], image.shape[1])
    spec = spec or video_spec(pipeline, num_frames)
    scale = jnp.float32(pipeline.defaults.cfg_scale if cfg_scale is None else cfg_scale)
    frames = _sample(engine, spec, pipeline.params, jnp.asarray(image), seed_key(seed), scale,
                     jnp.float32(fps_id), jnp.float32(motion_bucket_id), jnp.float32(cond_aug), int(num_frames),
                     None if decoding_t is None else int(decoding_t))
    return np.asarray(frames)


def sample_request(pipeline: Pipeline, image: np.ndarray, defaults: SamplingDefaults,
                   spec: SamplerSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """(frames, their metadata) for the request `defaults` describes (its num_frames, fps_id,
    motion_bucket_id, cond_aug, seed, cfg_scale, decoding_t): what sample.py and the demo both run."""
    d = defaults
    t0 = time.perf_counter()
    frames = sample_video(pipeline, image, num_frames=d.num_frames, fps_id=d.fps_id,
                          motion_bucket_id=d.motion_bucket_id, cond_aug=d.cond_aug, seed=d.seed, spec=spec,
                          cfg_scale=d.cfg_scale, decoding_t=d.decoding_t)
    meta = {"seed": d.seed, "sampler": spec.name, "steps": spec.steps, "guider": spec.guider, "cfg_scale": d.cfg_scale,
            "num_frames": d.num_frames, "fps_id": d.fps_id, "motion_bucket_id": d.motion_bucket_id,
            "cond_aug": d.cond_aug, "size": f"{image.shape[2]}x{image.shape[1]}",
            "seconds": round(time.perf_counter() - t0, 3)}
    return frames, meta


__all__ = ["is_video_config", "is_video_model", "sample_request", "sample_video", "video_conditioning",
           "video_from_noise", "video_spec"]
