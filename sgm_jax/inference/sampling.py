"""What a sampling run needs to know statically: sampler, steps, schedule, img2img / hand-off.

A `SamplerSpec` is hashable: it keys the compiled sampling function, so a new prompt, seed
or CFG scale reuses the compiled loop, while a new sampler, step count, schedule or
strength compiles a new one (its sigmas are baked into the loop as constants). The CFG
scale stays a traced argument: `build(scale)` constructs VanillaCFG(scale) inside jit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import numpy as np

from sgm_jax.diffusion.discretization import (
    Discretization,
    EDMDiscretization,
    Img2ImgDiscretizationWrapper,
    LegacyDDPMDiscretization,
    Txt2NoisyDiscretizationWrapper,
)
from sgm_jax.diffusion.guiders import IdentityGuider, LinearPredictionGuider, TrianglePredictionGuider, VanillaCFG
from sgm_jax.diffusion.samplers import SAMPLERS, BaseDiffusionSampler, canonical_sampler_name
from sgm_jax.sampling_defaults import hashable

SEED_RANGE = 2**32  # seeds are reduced modulo this: JAX keeps only the low 32 bits of a seed without x64


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a user's seed: any integer works, reduced modulo 2**32 (so 2**32 + 5 gives
    seed 5's images, as it always did: JAX itself keeps the low 32 bits of a 64-bit seed)."""
    return jax.random.key(int(seed) % SEED_RANGE)


# the seed's demo defaults for each sampler's extra knobs (streamlit_helpers.get_sampler)
_EDM = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 999.0, "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "euler_edm": _EDM, "heun_edm": _EDM, "euler_ancestral": _ANCESTRAL, "dpmpp2s_ancestral": _ANCESTRAL,
    "dpmpp2m": {}, "linear_multistep": {"order": 4},
    "substep_euler_ancestral": _ANCESTRAL,  # turbo.py: eta=1.0, s_noise left at 1.0
}
SAMPLER_NAMES = tuple(SAMPLER_DEFAULTS)
# guiders by the seed's class name, each built as guider(scale, **options)
GUIDERS: dict[str, Any] = {
    "VanillaCFG": lambda scale: VanillaCFG(scale),
    "IdentityGuider": lambda scale: IdentityGuider(),
    "LinearPredictionGuider": lambda scale, **o: LinearPredictionGuider(max_scale=scale, **o),
    "TrianglePredictionGuider": lambda scale, **o: TrianglePredictionGuider(max_scale=scale, **o),
}

# the seed demo's EDMDiscretization defaults for latent models (sampling params in api.py)
EDM_DEMO = {"sigma_min": 0.0292, "sigma_max": 14.6146, "rho": 3.0}




def make_discretization(name: str = "legacy_ddpm", **params: Any) -> Discretization:
    """'legacy_ddpm' / 'LegacyDDPMDiscretization' or 'edm' / 'EDMDiscretization' (seed demo defaults)."""
    key = name.lower().replace("discretization", "").replace("_", "")
    if key == "legacyddpm":
        return LegacyDDPMDiscretization(**params)
    if key == "edm":
        return EDMDiscretization(**{**EDM_DEMO, **params})
    raise ValueError(f"unknown discretization {name!r}; choose legacy_ddpm or edm")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as the seed's demo configures it.

    steps: what --steps means for the sampler (SubstepSampler: its n_sample_steps, 1 to 4).
    img2img_strength: wrap the schedule in Img2ImgDiscretizationWrapper (keep the lowest
      `strength` fraction: img2img and the refiner stage).
    stage2_strength: then wrap in Txt2NoisyDiscretizationWrapper(strength, original_steps=steps)
      (stop early, leaving that fraction to a refiner).
    options: the sampler's extra keyword arguments (s_churn, eta, order, ...) as sorted pairs.
    guided: the guider around the denoiser, else IdentityGuider; always off for a sampler
      that never uses uc (SubstepSampler, as the seed's turbo.py), where CFG would only double the batch.
    guider / guider_options: which guider, by the seed's class name: VanillaCFG(scale), or SVD's
      per-frame LinearPredictionGuider / TrianglePredictionGuider(max_scale=scale, **options: num_frames,
      min_scale, ...); "IdentityGuider" turns guidance off. The scale stays a traced argument of `build`.
    """

    name: str = "euler_edm"
    steps: int = 50
    discretization: Discretization = field(default_factory=LegacyDDPMDiscretization)
    options: tuple[tuple[str, Any], ...] = ()
    img2img_strength: float | None = None
    stage2_strength: float | None = None
    guided: bool = True
    guider: str = "VanillaCFG"
    guider_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(cls, name: str = "euler_edm", steps: int = 50, discretization: Discretization | str | None = None,
               img2img_strength: float | None = None, stage2_strength: float | None = None,
               guided: bool = True, guider: str = "VanillaCFG", guider_options: Mapping[str, Any] | None = None,
               **options: Any) -> "SamplerSpec":
        name = canonical_sampler_name(name)
        guider = str(guider).rsplit(".", 1)[-1]
        if guider not in GUIDERS:
            raise ValueError(f"unknown guider {guider!r}; choose one of: {', '.join(GUIDERS)}")
        guider_options = tuple(sorted((k, hashable(v)) for k, v in dict(guider_options or {}).items()))
        try:  # bad options fail here, not inside jit
            GUIDERS[guider](1.0, **dict(guider_options))
        except TypeError as e:
            raise ValueError(f"guider {guider}: {e} (guider_options {dict(guider_options)})") from None
        if isinstance(discretization, str) or discretization is None:
            discretization = make_discretization(discretization or "legacy_ddpm")
        unknown = set(options) - set(SAMPLER_DEFAULTS[name])
        if unknown:
            raise ValueError(f"sampler {name} takes no option(s) {sorted(unknown)}; "
                             f"it takes {sorted(SAMPLER_DEFAULTS[name]) or 'none'}")
        merged = {**SAMPLER_DEFAULTS[name], **options}
        for strength in (img2img_strength, stage2_strength):
            if strength is not None and not 0.0 <= float(strength) <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
        return cls(name, int(steps), discretization, tuple(sorted(merged.items())),
                   None if img2img_strength is None else float(img2img_strength),
                   None if stage2_strength is None else float(stage2_strength),
                   guided and guider != "IdentityGuider" and not SAMPLERS[name].guidance_free, guider, guider_options)

    def schedule(self) -> Discretization:
        """The discretization the sampler runs with, wrapped as the seed's init_sampling does."""
        disc = self.discretization
        if self.img2img_strength is not None:
            disc = Img2ImgDiscretizationWrapper(disc, strength=self.img2img_strength)
        if self.stage2_strength is not None:
            disc = Txt2NoisyDiscretizationWrapper(disc, strength=self.stage2_strength, original_steps=self.steps)
        return disc

    def sigmas(self) -> np.ndarray:
        """float32 [num_loop + 1] sigmas the loop visits: sigmas[0] is where it starts,
        sigmas[-1] where it ends (0 unless stopped early for a refiner)."""
        return np.asarray(self.build().sigmas(), np.float32)

    @property
    def num_loop(self) -> int:
        return len(self.sigmas()) - 1

    def make_guider(self, scale: Any = None) -> Any:
        """The guider at CFG scale `scale` (a video guider's max_scale); may be a tracer."""
        return GUIDERS[self.guider](scale, **dict(self.guider_options)) if self.guided else IdentityGuider()

    def build(self, scale: Any = None) -> BaseDiffusionSampler:
        """The sampler; `scale` may be a tracer (the guider is built inside the jitted function)."""
        guider = self.make_guider(scale)
        return SAMPLERS[self.name].with_steps(self.steps, discretization=self.schedule(), guider=guider,
                                              **dict(self.options))
