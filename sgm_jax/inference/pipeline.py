"""Text-to-image, image-to-image and the SDXL base -> refiner hand-off, as the seed's demo.

One `Pipeline` per model (SDXL base, SDXL refiner, SD 2.1-512 eps, SD 2.1-768 v: the same
code, the config decides). Per request:
  1. `PromptEncoder` (own jit): prompt / negative prompt / sizes -> c, uc  (batch 1)
  2. one jitted function  (params, x0, noise, c, uc, key, scale) -> uint8 images or latents:
     [img2img noising] -> sampler loop (denoise + CFG each step) -> [VAE decode -> uint8]
     compiled once per (sampler spec, stage flags, batch shape); prompts, seeds and the
     CFG scale are arguments, so changing them never recompiles.
Batches are split over the local devices of a data-parallel Mesh; requests larger than
one call's batch run in chunks of the same shape (the last one padded), so one compile
serves them all.

Randomness: image i's starting noise is N(0, I) drawn from fold_in(stage key, i), so it does
not depend on the device count or the chunking; the stochastic samplers' per-step noise
comes from one key per chunk (same seed, --num and --batch-size -> same images).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.engine import DiffusionEngine, build_engine
from sgm_jax.parallel import make_mesh, replicated

from .conditioning import ConditioningValues, PromptEncoder
from .runner import SamplingRunner, StepEvent, Timing, to_uint8  # noqa: F401  (re-exported)
from .sampling import SamplerSpec, seed_key

Cond = dict[str, jax.Array]


@dataclass
class SampleResult:
    """images: uint8 [N, H, W, 3], or None when the stage returned latents for a refiner;
    latents: float32 [N, h, w, c] in that case (else empty); sigmas: per stage (pipeline
    name), the schedule its sampler ran: sigmas[0] where it started, sigmas[-1] where it stopped."""

    images: np.ndarray | None
    latents: np.ndarray
    sigmas: dict[str, np.ndarray] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)  # per image: its class / prompt (trained workdirs)


def _model_params(config: Any) -> dict[str, Any]:
    model = config["model"]
    model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    return model.get("params", model)


def size_multiple(engine: DiffusionEngine) -> tuple[int, int, int]:
    """(pixel multiple, VAE factor, UNet factor): latents must divide by 2**(levels - 1)."""
    vae = engine.first_stage_factor
    unet = 2 ** (len(engine.network.channel_mult) - 1)
    return vae * unet, vae, unet


class SizeError(ValueError):
    """Width / height that the VAE and UNet strides cannot take."""


def check_size(engine: DiffusionEngine, width: int, height: int, name: str = "model") -> None:
    """Raise SizeError (one line) unless width and height fit the VAE and UNet strides."""
    multiple, vae, unet = size_multiple(engine)
    for what, value in (("width", width), ("height", height)):
        if int(value) != value or value < multiple or value % multiple:
            lower = max(multiple, int(value) // multiple * multiple)
            raise SizeError(
                f"{what} {value} px does not fit {name}: it must be a positive multiple of {multiple} px "
                f"(VAE factor {vae} x UNet downsampling {unet}); try {lower} or {lower + multiple}")


def default_zero_uc_keys(config: Any, conditioner_keys: list[str]) -> tuple[str, ...]:
    """The seed zeroes the uc text embeddings (force_uc_zero_embeddings=["txt"]) for the
    non-legacy model, SDXL base; configs may say so explicitly in
    `inference.force_uc_zero_embeddings`, else SDXL-base conditioning (target size) tells."""
    inference = config.get("inference") or {}
    if "force_uc_zero_embeddings" in inference:
        return tuple(inference["force_uc_zero_embeddings"] or ())
    return ("txt",) if {"txt", "target_size_as_tuple"} <= set(conditioner_keys) else ()


class Pipeline:
    """A model ready to sample. `params`: {"model", "conditioner", "first_stage"} (load_params)."""

    def __init__(self, config: Any, params: Mapping[str, Any], *, clip_tokenizer: Any = None,
                 dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, name: str = "model",
                 step_progress: bool | None = None) -> None:
        """config: an inference config (`model`, `inference`); dtype: compute dtype (default
        bfloat16 on accelerators, float32 on CPU); step_progress: see sgm_jax.inference.runner."""
        self.config, self.name = config, name
        self.inference = dict(config.get("inference") or {})
        if dtype is None:
            dtype = "float32" if jax.default_backend() == "cpu" else self.inference["dtype"]
        self.dtype = dtype
        self.engine = engine_for_sampling(config, dtype)
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
        self.params = jax.device_put(dict(params), replicated(self.mesh))
        # the sampling function needs no text towers: keep them out of its arguments
        self.sampling_params = {k: v for k, v in self.params.items() if k != "conditioner"}
        self.prompts = PromptEncoder(self.engine.conditioner, clip_tokenizer)
        self.zero_uc_keys = default_zero_uc_keys(config, self.prompts.keys)
        self.runner = SamplingRunner(self.engine, self.mesh, name, step_progress)
        self.timings: list[Timing] = self.runner.timings
        self._encode = jax.jit(self.engine.encode_first_stage)

    # --- conditioning --------------------------------------------------------------------
    def condition(self, values: ConditioningValues) -> tuple[Cond, Cond]:
        """c, uc (batch 1). A non-empty negative prompt is always encoded; with an empty one,
        the model's zero_uc_keys apply (SDXL base: zero uc text, as the seed)."""
        zero = self.zero_uc_keys if not values.negative_prompt else ()
        t0 = time.perf_counter()
        c, uc = self.prompts(self.params.get("conditioner", {}), values, zero)
        jax.block_until_ready((c, uc))
        self.timings.append(Timing(f"{self.name}: text", 0.0, time.perf_counter() - t0))
        return c, uc

    def check_size(self, width: int, height: int) -> None:
        check_size(self.engine, width, height, self.name)

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        return tuple(self.engine.latent_shape((n, height, width, 3)))  # type: ignore[return-value]

    # --- modes ---------------------------------------------------------------------------
    def values(self, prompt: str, negative_prompt: str, width: int, height: int, **kw: Any) -> ConditioningValues:
        extra = {k: self.inference[k] for k in ("aesthetic_score", "negative_aesthetic_score") if k in self.inference}
        return ConditioningValues.for_size(prompt, negative_prompt, width, height, **{**extra, **kw})

    def txt2img(self, prompt: str, negative_prompt: str = "", *, width: int | None = None, height: int | None = None,
                num: int = 1, seed: int = 42, spec: SamplerSpec | None = None, cfg_scale: float | None = None,
                decode: bool = True, stage: int = 0, **run_kw: Any) -> SampleResult:
        """Text to image. With spec.stage2_strength set and decode=False: noisy latents for a refiner.
        run_kw: batch_size, progress (SamplingRunner.run)."""
        width = int(width or self.inference["width"])
        height = int(height or self.inference["height"])
        self.check_size(width, height)
        spec = spec or self.default_spec()
        c, uc = self.condition(self.values(prompt, negative_prompt, width, height))
        latent = self.latent_shape(1, width, height)[1:]
        return self._run(spec, c, uc, num, latent, None, True, decode, seed, stage, cfg_scale, run_kw)

    def img2img(self, image: np.ndarray, prompt: str, negative_prompt: str = "", *, strength: float = 0.75,
                num: int = 1, seed: int = 42, spec: SamplerSpec | None = None, cfg_scale: float | None = None,
                decode: bool = True, stage: int = 0, **run_kw: Any) -> SampleResult:
        """image: [1, H, W, 3] float in [-1, 1] (load_image). Encoded with the VAE (posterior
        mode), noised to the first kept sigma and sampled on the lowest `strength` of the
        schedule (Img2ImgDiscretizationWrapper), as the seed's do_img2img."""
        image = np.asarray(image, np.float32)
        height, width = image.shape[1:3]
        self.check_size(width, height)
        spec = dataclasses.replace(spec or self.default_spec(), img2img_strength=float(strength))
        c, uc = self.condition(self.values(prompt, negative_prompt, width, height))
        z = self._encode(self.params, jnp.asarray(image[:1]))
        return self._run(spec, c, uc, num, z.shape[1:], z, True, decode, seed, stage, cfg_scale, run_kw)

    def refine(self, latents: np.ndarray, prompt: str, negative_prompt: str = "", *, strength: float | None = None,
               seed: int = 42, spec: SamplerSpec | None = None, cfg_scale: float | None = None,
               add_noise: bool = False, stage: int = 1, **run_kw: Any) -> SampleResult:
        """The seed's apply_refiner: img2img on latents [N, h, w, c] (skip_encode), size
        conditioning = latent size * VAE factor, crop 0, aesthetic 6.0 / 2.5. add_noise=False
        is the demo's "finish denoising" hand-off: the base latents already carry sigma_0's noise."""
        latents = np.asarray(latents, np.float32)
        _, vae_factor, _ = size_multiple(self.engine)
        height, width = latents.shape[1] * vae_factor, latents.shape[2] * vae_factor
        strength = float(self.inference["refiner_strength"] if strength is None else strength)
        spec = dataclasses.replace(spec or self.default_spec(), img2img_strength=strength)
        c, uc = self.condition(self.values(prompt, negative_prompt, width, height))
        return self._run(spec, c, uc, len(latents), latents.shape[1:], latents, add_noise, True, seed, stage,
                         cfg_scale, run_kw)

    def batch_size(self, num: int) -> int:
        """Images per compiled call for a request of `num`: inference.batch_per_device per device."""
        return min(int(self.inference["batch_per_device"]) * self.mesh.size, num)

    def default_spec(self) -> SamplerSpec:
        inf = self.inference
        return SamplerSpec.create(inf["sampler"], inf["num_steps"], inf["discretization"])

    def _run(self, spec: SamplerSpec, c: Cond, uc: Cond, num: int, latent_shape: tuple[int, ...], x0: Any,
             add_noise: bool, decode: bool, seed: int, stage: int, cfg_scale: float | None,
             run_kw: dict[str, Any]) -> SampleResult:
        # stage: base 0, refiner 1 -> independent random streams from one seed
        scale = float(self.inference["cfg_scale"] if cfg_scale is None else cfg_scale)
        run_kw = {**run_kw, "batch_size": run_kw.get("batch_size") or self.batch_size(num)}
        out = self.runner.run(self.sampling_params, spec, c, uc, num=num, latent_shape=tuple(latent_shape), x0=x0,
                              add_noise=add_noise, decode=decode, cfg_scale=scale,
                              seed_key=jax.random.fold_in(seed_key(seed), stage), **run_kw)
        sigmas = {self.name: spec.sigmas()}
        if decode:
            return SampleResult(images=out, latents=np.empty((0,), np.float32), sigmas=sigmas)
        return SampleResult(images=None, latents=out, sigmas=sigmas)


def engine_for_sampling(config: Any, dtype: str) -> DiffusionEngine:
    """build_engine, with the VAE kept in float32 where the config says disable_first_stage_autocast
    (the seed runs its first stage outside autocast: decoding in half precision can overflow)."""
    model = _model_params(config)
    engine = build_engine(config["model"], dtype)
    if engine.first_stage is not None and model.get("disable_first_stage_autocast", False):
        fs = engine.first_stage
        engine = dataclasses.replace(engine, first_stage=type(fs)(embed_dim=fs.embed_dim, ddconfig=fs.ddconfig,
                                                                  dtype=jnp.float32))
    return engine


def txt2img_with_refiner(base: Pipeline, refiner: Pipeline, prompt: str, negative_prompt: str = "", *,
                         strength: float = 0.15, width: int | None = None, height: int | None = None, num: int = 1,
                         seed: int = 42, base_spec: SamplerSpec | None = None,
                         refiner_spec: SamplerSpec | None = None, cfg_scale: float | None = None,
                         refiner_cfg_scale: float | None = None, init_image: np.ndarray | None = None,
                         img2img_strength: float = 0.75, **run_kw: Any) -> SampleResult:
    """The seed demo's two-stage recipe: the base samples with Txt2NoisyDiscretizationWrapper
    (strength, original_steps=steps), stopping at a sigma > 0 and returning latents; the
    refiner finishes them with Img2ImgDiscretizationWrapper(strength), starting at that sigma."""
    base_spec = dataclasses.replace(base_spec or base.default_spec(), stage2_strength=float(strength))
    if init_image is None:
        first = base.txt2img(prompt, negative_prompt, width=width, height=height, num=num, seed=seed,
                             spec=base_spec, cfg_scale=cfg_scale, decode=False, **run_kw)
    else:
        first = base.img2img(init_image, prompt, negative_prompt, strength=img2img_strength, num=num, seed=seed,
                             spec=base_spec, cfg_scale=cfg_scale, decode=False, **run_kw)
    second = refiner.refine(first.latents, prompt, negative_prompt, strength=strength, seed=seed, spec=refiner_spec,
                            cfg_scale=refiner_cfg_scale if refiner_cfg_scale is not None else cfg_scale, **run_kw)
    second.sigmas = {**first.sigmas, **second.sigmas}
    return second
