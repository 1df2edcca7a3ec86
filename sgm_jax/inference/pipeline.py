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
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.engine import DiffusionEngine, build_engine
from sgm_jax.errors import UserError
from sgm_jax.model_inputs import CLASS_KEY, TEXT_KEY
from sgm_jax.nn.conditioner import class_count
from sgm_jax.parallel import make_mesh, replicated
from sgm_jax.sampling_defaults import AS_TRAINED, SamplingDefaults

from .conditioning import ConditioningValues, PromptEncoder
from .runner import SamplingRunner, StepEvent, Timing, to_uint8  # noqa: F401  (re-exported)
from .sampling import SAMPLER_DEFAULTS, SamplerSpec, canonical_sampler_name, make_discretization, seed_key

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


class Pipeline:
    """One model ready to sample, whatever its weights' source: converted weights (load_pipeline)
    or a train.py workdir (workdir.TrainedModel.load). `params`: {"model", "conditioner",
    "first_stage"}. Prompts, class ids or nothing condition it, as its conditioner says:
    txt2img / img2img / refine take prompts; `sample` takes a list of conditions."""

    def __init__(self, config: Any, params: Mapping[str, Any], *, engine: DiffusionEngine | None = None,
                 image_shape: Sequence[int] | None = None, clip_tokenizer: Any = None, dtype: str | None = None,
                 mesh: jax.sharding.Mesh | None = None, name: str = "model",
                 step_progress: bool | None = None) -> None:
        """config: with an `inference` section (sampler defaults); engine: built from config.model
        when None, computing in dtype (default bfloat16 on accelerators, float32 on CPU);
        image_shape: (H, W, C) that `sample` draws (default: the inference size, RGB);
        step_progress: see sgm_jax.inference.runner."""
        self.config, self.name = config, name
        self.defaults = SamplingDefaults.from_config(config)
        if engine is None:
            if dtype is None:
                dtype = "float32" if jax.default_backend() == "cpu" else self.defaults.dtype
            engine = engine_for_sampling(config, dtype)
        self.dtype = dtype or "float32"
        self.engine = engine
        self.image_shape = tuple(image_shape) if image_shape is not None else (
            self.defaults.height, self.defaults.width, 3)
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
        self.params = jax.device_put(dict(params), replicated(self.mesh))
        # the sampling function needs no text towers: keep them out of its arguments
        self.sampling_params = {k: v for k, v in self.params.items() if k != "conditioner"}
        self.prompts = PromptEncoder(engine.conditioner, clip_tokenizer)
        self.zero_uc_keys = self.defaults.zero_uc_keys(self.prompts.keys)
        conditions = [s for s in engine.conditioner.specs if s.input_key in (CLASS_KEY, TEXT_KEY)]
        self.condition_key: str | None = conditions[0].input_key if conditions else None
        self.n_classes = class_count(engine.conditioner.specs)
        self.runner = SamplingRunner(engine, self.mesh, name, step_progress)
        self.timings: list[Timing] = self.runner.timings
        self._encode = jax.jit(engine.encode_first_stage)

    @property
    def conditional(self) -> bool:
        return self.condition_key is not None

    # --- conditioning --------------------------------------------------------------------
    def encode(self, values: ConditioningValues, timed: bool = False) -> tuple[Cond, Cond]:
        """c, uc (batch 1). zero_uc_keys' uc embeddings are zeros (SDXL base: the text, as the
        seed; a trained model: what training dropped), except the text when a negative prompt
        is given: that is always encoded."""
        zero = tuple(k for k in self.zero_uc_keys if not (values.negative_prompt and k == TEXT_KEY))
        t0 = time.perf_counter()
        c, uc = self.prompts(self.params.get("conditioner", {}), values, zero)
        if timed:
            jax.block_until_ready((c, uc))
            self.timings.append(Timing(f"{self.name}: text", 0.0, time.perf_counter() - t0))
        return c, uc

    def condition(self, condition: Any = None, negative_prompt: str = "") -> tuple[Cond, Cond]:
        """c, uc (batch 1) for one class id / prompt (or None, unconditional) at image_shape's size
        (SDXL's size and crop inputs take the seed's sampling values: original = target, crop 0),
        or for the seed's whole value dict (a ConditioningValues, e.g. from `values`)."""
        if isinstance(condition, ConditioningValues):
            return self.encode(condition, timed=True)
        height, width = self.image_shape[:2]
        prompt = str(condition) if self.condition_key == TEXT_KEY else ""
        label = int(condition) if self.condition_key == CLASS_KEY else 0
        return self.encode(self.values(prompt, negative_prompt, width, height, class_label=label))

    def check_conditions(self, conditions: Sequence[Any]) -> list[Any]:
        """The conditions `sample` takes (class ids as ints), or one UserError line."""
        if not self.conditional:
            if any(c not in (None, "") for c in conditions):
                raise UserError(f"the model {self.name} is unconditional: it takes no classes or prompts")
            return [None]
        if not conditions:
            raise UserError(f"the model {self.name} is conditioned on "
                            f"{'classes' if self.condition_key == CLASS_KEY else 'prompts'}: give at least one")
        if self.condition_key != CLASS_KEY:
            return [str(c) for c in conditions]
        out = []
        for c in conditions:
            if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
                raise UserError(f"class {c!r} is not an integer")
            if not 0 <= int(c) < int(self.n_classes):  # type: ignore[arg-type]
                raise UserError(f"class {int(c)} out of range: this model has {self.n_classes} classes (0..."
                                f"{int(self.n_classes) - 1})")  # type: ignore[arg-type]
            out.append(int(c))
        return out

    def check_size(self, width: int, height: int) -> None:
        check_size(self.engine, width, height, self.name)

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        return tuple(self.engine.latent_shape((n, height, width, self.image_shape[2])))  # type: ignore[return-value]

    def values(self, prompt: str, negative_prompt: str, width: int, height: int, **kw: Any) -> ConditioningValues:
        kw = {"aesthetic_score": self.defaults.aesthetic_score,
              "negative_aesthetic_score": self.defaults.negative_aesthetic_score, **kw}
        return ConditioningValues.for_size(prompt, negative_prompt, width, height, **kw)

    # --- sampler settings ----------------------------------------------------------------
    def spec(self, sampler: str | None = None, steps: int | None = None, discretization: str | None = None,
             guided: bool | None = None, **options: Any) -> SamplerSpec:
        """SamplerSpec from the inference section; a trained model's own sampler options and
        schedule (discretization "config") unless another sampler / discretization is named.
        guided: None: when a prompt or class conditions the model (an image-to-video model says True)."""
        name = canonical_sampler_name(sampler or self.defaults.sampler)
        disc_name = discretization or self.defaults.discretization
        trained = self.engine.sampler
        if disc_name == AS_TRAINED:
            disc = trained.discretization if trained is not None else make_discretization("edm")
        else:
            disc = make_discretization(disc_name)
        if trained is not None and canonical_sampler_name(type(trained).__name__) == name:
            options = {**{k: getattr(trained, k) for k in SAMPLER_DEFAULTS[name] if hasattr(trained, k)}, **options}
        return SamplerSpec.create(name, int(steps or self.defaults.num_steps), disc,
                                  guided=self.conditional if guided is None else guided,
                                  guider=self.defaults.guider, guider_options=dict(self.defaults.guider_options),
                                  **options)

    def default_spec(self) -> SamplerSpec:
        return self.spec()

    def batch_size(self, num: int) -> int:
        """Images per compiled call for a request of `num`: inference.batch_per_device per device."""
        return min(int(self.defaults.batch_per_device) * self.mesh.size, num)

    # --- modes ---------------------------------------------------------------------------
    def sample(self, conditions: Sequence[Any] = (), *, num: int = 1, seed: int = 42, spec: SamplerSpec | None = None,
               cfg_scale: float | None = None, negative_prompt: str = "", batch_size: int | None = None,
               progress: Callable[[StepEvent], None] | None = None, start: int = 0,
               count: int | None = None) -> SampleResult:
        """`num` images per condition (class id / prompt), condition-major: uint8
        [len(conditions) * num, H, W, C] at image_shape.

        Image i's noise depends on (seed, i) only; batch_size: images per compiled call
        (default `batch_size(total)`). start / count: only images start ... start + count - 1 of
        the request (start a multiple of the batch size), the same pixels, for long requests."""
        conditions = self.check_conditions(conditions)
        total = len(conditions) * num
        count = total - start if count is None else min(count, total - start)
        rows = np.arange(start, start + count) // num  # the condition of each image asked for
        used = sorted(set(rows.tolist()))
        encoded = {i: self.condition(conditions[i], negative_prompt) for i in used}
        c, uc = (jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[np.searchsorted(used, rows)],
                                        *[encoded[i][k] for i in used]) for k in (0, 1))
        spec = spec or self.default_spec()
        scale = float(self.defaults.cfg_scale if cfg_scale is None else cfg_scale)
        latent = tuple(self.engine.latent_shape((1,) + self.image_shape))[1:]
        images = self.runner.run(self.sampling_params, spec, c, uc, num=count, latent_shape=latent, cfg_scale=scale,
                                 seed_key=seed_key(seed), batch_size=batch_size or self.batch_size(total),
                                 progress=progress, first_index=start)
        captions = [str(conditions[i]) for i in rows] if self.conditional else []
        return SampleResult(images=images, latents=np.empty((0,), np.float32), sigmas={self.name: spec.sigmas()},
                            captions=captions)

    def txt2img(self, prompt: str, negative_prompt: str = "", *, width: int | None = None, height: int | None = None,
                num: int = 1, seed: int = 42, spec: SamplerSpec | None = None, cfg_scale: float | None = None,
                decode: bool = True, stage: int = 0, **run_kw: Any) -> SampleResult:
        """Text to image. With spec.stage2_strength set and decode=False: noisy latents for a refiner.
        run_kw: batch_size, progress (SamplingRunner.run)."""
        width = int(width or self.defaults.width)
        height = int(height or self.defaults.height)
        self.check_size(width, height)
        spec = spec or self.default_spec()
        c, uc = self.encode(self.values(prompt, negative_prompt, width, height), timed=True)
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
        c, uc = self.encode(self.values(prompt, negative_prompt, width, height), timed=True)
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
        strength = float(self.defaults.refiner_strength if strength is None else strength)
        spec = dataclasses.replace(spec or self.default_spec(), img2img_strength=strength)
        c, uc = self.encode(self.values(prompt, negative_prompt, width, height), timed=True)
        return self._run(spec, c, uc, len(latents), latents.shape[1:], latents, add_noise, True, seed, stage,
                         cfg_scale, run_kw)

    def _run(self, spec: SamplerSpec, c: Cond, uc: Cond, num: int, latent_shape: tuple[int, ...], x0: Any,
             add_noise: bool, decode: bool, seed: int, stage: int, cfg_scale: float | None,
             run_kw: dict[str, Any]) -> SampleResult:
        # stage: base 0, refiner 1 -> independent random streams from one seed
        scale = float(self.defaults.cfg_scale if cfg_scale is None else cfg_scale)
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
        # clone keeps every field (an AutoencodingEngine's use_quant_conv, SVD's VideoDecoder target)
        engine = dataclasses.replace(engine, first_stage=engine.first_stage.clone(dtype=jnp.float32))
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
