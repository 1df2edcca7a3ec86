"""A model's sampling defaults, resolved once from a config's `inference` section into a frozen,
typed spec: what sample.py, the demo and the sampling Pipeline fall back on when a request
leaves a setting out.

    defaults = SamplingDefaults.from_config(config)      # configs/inference/* or a workdir's config
    defaults.num_steps, defaults.cfg_scale, defaults.width

Every default lives here: configs/inference/_parts.py builds the converted models' sections from
this class, and a train.py workdir's section (`for_trained`) starts from the training config's
own sampler, steps and CFG scale. `--config.inference.FIELD=V` overrides any field; a field this
class does not know is one error line naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sgm_jax.diffusion.guiders import VanillaCFG
from sgm_jax.diffusion.samplers import canonical_sampler_name
from sgm_jax.engine import DiffusionEngine
from sgm_jax.errors import UserError

# the discretization name that means "the schedule the model was trained with" (a workdir's sampler)
AS_TRAINED = "config"


@dataclass(frozen=True)
class SamplingDefaults:
    """The seed's demo defaults (scripts/demo/sampling.py, streamlit_helpers.init_sampling)."""

    width: int = 1024
    height: int = 1024
    num_steps: int = 50                      # streamlit_helpers.init_sampling default
    sampler: str = "EulerEDMSampler"         # first entry of the seed's sampler list
    discretization: str = "LegacyDDPMDiscretization"
    guider: str = "VanillaCFG"              # or SVD's LinearPredictionGuider / TrianglePredictionGuider
    guider_options: tuple[tuple[str, Any], ...] = ()   # a video guider's num_frames, min_scale, ...
    cfg_scale: float = 5.0                   # streamlit_helpers.get_guider default
    negative_prompt: str = ""
    num_samples: int = 1
    seed: int = 42
    dtype: str = "bfloat16"                  # compute dtype on accelerators ("float32" on CPU)
    # for each text embedder, in order, the tokenizer sub-folder of a diffusers-style checkpoint
    # folder ("tokenizer" = CLIP-L, "tokenizer_2" = OpenCLIP); None: sgm_jax.nn.tokenizer's places
    tokenizers: tuple[str | None, ...] = (None,)
    tokenizer_path: str | None = None
    checkpoint: str | None = None            # Orbax directory written by convert_torch_weights.py
    img2img_strength: float = 0.75           # streamlit_helpers' img2img strength default
    refiner_strength: float = 0.15           # share of the schedule a refiner runs (sampling.py default)
    refiner_config: str | None = None        # a refiner config name / file for the base -> refiner hand-off
    refiner_checkpoint: str | None = None
    batch_per_device: int = 2                # images per device per compiled call (CFG doubles it)
    resolutions: tuple[tuple[int, int], ...] = ()   # (width, height) choices offered by the demo
    crop_coords_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0             # the refiner's aesthetic conditioning (sampling.py)
    negative_aesthetic_score: float = 2.5
    # image to video (SVD; scripts/sampling/simple_video_sample.py's defaults)
    num_frames: int = 14
    fps_id: int = 6                          # the frame rate conditioning; videos are written at fps_id + 1
    motion_bucket_id: int = 127
    cond_aug: float = 0.02                   # noise added to the conditioning frame's latent input
    decoding_t: int = 14                     # frames the VideoDecoder decodes per call
    # inputs whose unconditional embedding is zeros; None: SDXL base's rule (zero_uc_keys)
    force_uc_zero_embeddings: tuple[str, ...] | None = None

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "SamplingDefaults":
        """From a config's `inference` section (a ConfigDict or dict); missing fields keep the defaults."""
        given = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
        unknown = sorted(set(given) - set(cls.fields()))
        if unknown:
            raise UserError(f"config.inference has unknown field(s) {', '.join(unknown)}; "
                            f"the fields are {', '.join(cls.fields())}")
        if "guider_options" in given:  # a mapping in the section, sorted pairs in the spec
            given["guider_options"] = tuple(sorted(dict(given["guider_options"] or {}).items()))
        return cls(**{k: hashable(v) for k, v in given.items()})

    @classmethod
    def from_config(cls, config: Any) -> "SamplingDefaults":
        return cls.from_section(config.get("inference") if config is not None else None)

    @classmethod
    def for_trained(cls, engine: DiffusionEngine, image_shape: Sequence[int], **given: Any) -> "SamplingDefaults":
        """A train.py workdir's defaults: the training config's sampler, steps and CFG scale and
        its image size, the schedule it was trained with, 64 images per device per call (small
        models), the uc zeroing what training dropped (the seed's log_images: ucg_rate > 0);
        `given` (the workdir config's own inference section) wins."""
        smp = engine.sampler
        guider = getattr(smp, "guider", None)
        video = guider is not None and hasattr(guider, "frame_scales")  # a per-frame (SVD) guider: kept as trained
        trained = dict(
            sampler=canonical_sampler_name(type(smp).__name__) if smp is not None else "euler_edm",
            num_steps=int(getattr(smp, "num_steps", None) or 50), discretization=AS_TRAINED,
            cfg_scale=float(guider.scale) if isinstance(guider, VanillaCFG) else (
                float(guider.max_scale) if video else 1.0),
            height=int(image_shape[0]), width=int(image_shape[1]), batch_per_device=64,
            force_uc_zero_embeddings=tuple(s.input_key for s in engine.conditioner.specs
                                           if s.ucg_rate > 0 and s.input_key))
        if video:
            options = {f.name: getattr(guider, f.name) for f in dataclasses.fields(guider) if f.name != "max_scale"}
            trained.update(guider=type(guider).__name__, guider_options=options)
        return cls.from_section({**trained, **given})

    def section(self, **overrides: Any) -> dict[str, Any]:
        """The `inference` section a config holds (lists where ConfigDict keeps them)."""
        out = {k: _listed(v) for k, v in dataclasses.asdict(self).items()}
        out["guider_options"] = {k: _listed(v) for k, v in self.guider_options}
        out.update(overrides)
        return out

    def zero_uc_keys(self, conditioner_keys: Sequence[str]) -> tuple[str, ...]:
        """The seed zeroes the uc text embeddings (force_uc_zero_embeddings=["txt"]) for the
        non-legacy model, SDXL base; a config may say so explicitly, else SDXL-base
        conditioning (a target size input) tells."""
        if self.force_uc_zero_embeddings is not None:
            return tuple(self.force_uc_zero_embeddings)
        return ("txt",) if {"txt", "target_size_as_tuple"} <= set(conditioner_keys) else ()


def _listed(v: Any) -> Any:
    return [_listed(x) for x in v] if isinstance(v, tuple) else v


def hashable(v: Any) -> Any:
    """Lists (ConfigDict's, JSON's) as tuples, nested too: what a hashable spec holds."""
    return tuple(hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


__all__ = ["AS_TRAINED", "SamplingDefaults", "hashable"]
