"""Sampling pipelines (txt2img, img2img, SDXL base -> refiner) used by sample.py and importable:

    from sgm_jax.inference import Pipeline, SamplerSpec, load_config, load_pipeline
    pipe = load_pipeline(load_config("inference/sd_xl_base"), "checkpoints/sd_xl_base",
                         config_label="inference/sd_xl_base")     # checked against the config
    model = TrainedModel.load("workdir/mnist_cond_cpu")            # a train.py run (classes / prompts)
    images = pipe.txt2img("an astronaut riding a horse", num=4, seed=42,
                          spec=SamplerSpec.create("euler_edm", 40), cfg_scale=5.0).images  # uint8 [4, H, W, 3]
"""

from sgm_jax.config_files import load_config

from .conditioning import ConditioningValues, PromptEncoder, get_batch
from .loading import SetupError, enable_compilation_cache, load_checkpoint, load_clip_tokenizer, load_image
from .models import ModelCache, check_params, load_pipeline
from .pipeline import (Pipeline, SampleResult, SizeError, StepEvent, check_size, engine_for_sampling, to_uint8,
                       txt2img_with_refiner)
from .sampling import SAMPLER_NAMES, SamplerSpec, make_discretization
from .workdir import TrainedModel

__all__ = [
    "ConditioningValues", "ModelCache", "Pipeline", "PromptEncoder", "SAMPLER_NAMES", "SampleResult", "SamplerSpec",
    "SetupError", "SizeError", "StepEvent", "TrainedModel", "check_params", "check_size", "enable_compilation_cache",
    "engine_for_sampling", "get_batch", "load_checkpoint", "load_clip_tokenizer", "load_config", "load_image",
    "load_pipeline", "make_discretization", "to_uint8", "txt2img_with_refiner",
]
