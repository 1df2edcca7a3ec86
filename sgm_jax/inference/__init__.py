"""Sampling pipelines (txt2img, img2img, SDXL base -> refiner) used by sample.py and importable:

    from sgm_jax.inference import Pipeline, SamplerSpec, load_config, load_checkpoint
    config = load_config("configs/inference/sd_xl_base.py")
    pipe = Pipeline(config, load_checkpoint("checkpoints/sd_xl_base", "configs/inference/sd_xl_base.py"),
                    clip_tokenizer=load_clip_tokenizer(config, None))
    images = pipe.txt2img("an astronaut riding a horse", num=4, seed=42,
                          spec=SamplerSpec.create("euler_edm", 40), cfg_scale=5.0).images  # uint8 [4, H, W, 3]
"""

from .conditioning import ConditioningValues, PromptEncoder, get_batch
from .loading import (SetupError, enable_compilation_cache, load_checkpoint, load_clip_tokenizer, load_config,
                      load_image)
from .pipeline import (Pipeline, SampleResult, SizeError, StepEvent, check_size, engine_for_sampling, to_uint8,
                       txt2img_with_refiner)
from .sampling import SAMPLER_NAMES, SamplerSpec, make_discretization

__all__ = [
    "ConditioningValues", "Pipeline", "PromptEncoder", "SAMPLER_NAMES", "SampleResult", "SamplerSpec", "SetupError",
    "SizeError", "StepEvent", "engine_for_sampling",
    "check_size", "enable_compilation_cache", "get_batch", "load_checkpoint", "load_clip_tokenizer", "load_config",
    "load_image", "make_discretization", "to_uint8", "txt2img_with_refiner",
]
