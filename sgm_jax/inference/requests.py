"""One request to a converted model (SDXL, SD 2.1, Turbo), as sample.py and the demo both make it:
text-to-image, image-to-image from an init image, and the SDXL base -> refiner hand-off.

    request = ImageRequest.create(SamplingDefaults.from_config(config), prompt="a lighthouse", num=4)
    images = generate(base, refiner, request, batch_size=4)      # uint8 [4, H, W, 3]
    png_metadata = request.metadata()

`ImageRequest.create` fills whatever a caller leaves None from the model's sampling defaults
(its config's `inference` section, resolved once: sampler, steps, discretization, size, CFG scale,
strengths, negative prompt, seed), so the two front ends cannot drift apart; `generate` picks the mode, `metadata` describes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from sgm_jax.sampling_defaults import SamplingDefaults

from .pipeline import Pipeline, txt2img_with_refiner
from .sampling import SamplerSpec


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """What to sample. init_image: [1, H, W, 3] in [-1, 1] (load_image) or None for text-to-image;
    refiner_spec: the refiner's sampler (used only when a refiner is given to `generate`)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num: int
    seed: int
    spec: SamplerSpec
    refiner_spec: SamplerSpec
    cfg_scale: float
    refiner_cfg_scale: float | None = None
    init_image: np.ndarray | None = None
    img2img_strength: float = 0.75
    refiner_strength: float = 0.15

    @classmethod
    def create(cls, defaults: SamplingDefaults | Mapping[str, Any], *, prompt: str, negative_prompt: str | None = None,
               width: int | None = None, height: int | None = None, num: int | None = None, seed: int | None = None,
               sampler: str | None = None, steps: int | None = None, refiner_steps: int | None = None,
               discretization: str | None = None, options: Mapping[str, float] | None = None,
               cfg_scale: float | None = None, refiner_cfg_scale: float | None = None,
               init_image: np.ndarray | None = None, img2img_strength: float | None = None,
               refiner_strength: float | None = None) -> "ImageRequest":
        """The request with every argument left None taken from the model's sampling defaults
        (SamplingDefaults.from_config). The size of an init image wins over width / height."""
        d = defaults if isinstance(defaults, SamplingDefaults) else SamplingDefaults.from_section(defaults)
        if init_image is not None:
            height, width = np.shape(init_image)[1:3]
        name, disc = sampler or d.sampler, discretization or d.discretization
        steps = int(steps or d.num_steps)
        options = dict(options or {})

        def pick(value: Any, key: str) -> Any:
            return getattr(d, key) if value is None else value

        return cls(prompt=str(prompt), negative_prompt=str(pick(negative_prompt, "negative_prompt")),
                   width=int(width or d.width), height=int(height or d.height),
                   num=int(pick(num, "num_samples")), seed=int(pick(seed, "seed")),
                   spec=SamplerSpec.create(name, steps, disc, guider=d.guider,
                                           guider_options=dict(d.guider_options), **options),
                   refiner_spec=SamplerSpec.create(name, int(refiner_steps or steps), disc, **options),
                   cfg_scale=float(pick(cfg_scale, "cfg_scale")), refiner_cfg_scale=refiner_cfg_scale,
                   init_image=init_image, img2img_strength=float(pick(img2img_strength, "img2img_strength")),
                   refiner_strength=float(pick(refiner_strength, "refiner_strength")))

    def metadata(self, refiner: Pipeline | None = None) -> dict[str, Any]:
        """What a saved PNG says about how it was made (the front ends add model and file facts)."""
        meta: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                                "sampler": self.spec.name, "steps": self.spec.steps, "cfg_scale": self.cfg_scale,
                                "width": self.width, "height": self.height, "size": f"{self.width}x{self.height}",
                                "discretization": type(self.spec.discretization).__name__,
                                "options": dict(self.spec.options)}
        if self.init_image is not None:
            meta["strength"] = self.img2img_strength
        if refiner is not None:
            meta.update(refiner=refiner.name, refiner_strength=self.refiner_strength,
                        refiner_steps=self.refiner_spec.steps)
        return meta


def generate(base: Pipeline, refiner: Pipeline | None, request: ImageRequest, *, num: int | None = None,
             **run_kw: Any) -> np.ndarray:
    """uint8 [num, H, W, 3] for `request` (num: this call's share of request.num, e.g. one block of
    a long request with run_kw first_index); run_kw: batch_size, progress, first_index."""
    r, count = request, int(request.num if num is None else num)
    if refiner is not None:
        return txt2img_with_refiner(
            base, refiner, r.prompt, r.negative_prompt, strength=r.refiner_strength, width=r.width, height=r.height,
            num=count, seed=r.seed, base_spec=r.spec, refiner_spec=r.refiner_spec, cfg_scale=r.cfg_scale,
            refiner_cfg_scale=r.refiner_cfg_scale, init_image=r.init_image, img2img_strength=r.img2img_strength,
            **run_kw).images
    if r.init_image is not None:
        return base.img2img(r.init_image, r.prompt, r.negative_prompt, strength=r.img2img_strength, num=count,
                            seed=r.seed, spec=r.spec, cfg_scale=r.cfg_scale, **run_kw).images
    return base.txt2img(r.prompt, r.negative_prompt, width=r.width, height=r.height, num=count, seed=r.seed,
                        spec=r.spec, cfg_scale=r.cfg_scale, **run_kw).images
