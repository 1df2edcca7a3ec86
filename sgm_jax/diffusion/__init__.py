"""The seed's denoiser framework as pure jax.numpy: one module per concept.

Everything is importable from here too, e.g. `from sgm_jax.diffusion import EulerEDMSampler`.
"""

from sgm_jax.diffusion.denoiser import Denoiser, DiscreteDenoiser, append_dims
from sgm_jax.diffusion.discretization import (EDMDiscretization, Img2ImgDiscretizationWrapper,
                                              LegacyDDPMDiscretization, Txt2NoisyDiscretizationWrapper)
from sgm_jax.diffusion.guiders import (DynamicThresholding, IdentityGuider, LinearPredictionGuider, NoDynamicThresholding,
                                       TrianglePredictionGuider, VanillaCFG)
from sgm_jax.diffusion.loss import StandardDiffusionLoss
from sgm_jax.diffusion.registry import instantiate_from_config
from sgm_jax.diffusion.samplers import (SAMPLERS, DPMPP2MSampler, DPMPP2SAncestralSampler, EulerAncestralSampler,
                                        EulerEDMSampler, HeunEDMSampler, LinearMultistepSampler, SubstepSampler,
                                        get_sampler)
from sgm_jax.diffusion.scaling import EDMScaling, EpsScaling, VScaling, VScalingWithEDMcNoise
from sgm_jax.diffusion.sigma_sampling import DiscreteSampling, EDMSampling
from sgm_jax.diffusion.weighting import EDMWeighting, EpsWeighting, UnitWeighting, VWeighting

__all__ = [
    "DPMPP2MSampler", "DPMPP2SAncestralSampler", "Denoiser", "DiscreteDenoiser", "DiscreteSampling",
    "DynamicThresholding", "EDMDiscretization", "EDMSampling", "EDMScaling", "EDMWeighting", "EpsScaling",
    "EpsWeighting", "EulerAncestralSampler", "EulerEDMSampler", "HeunEDMSampler", "IdentityGuider",
    "Img2ImgDiscretizationWrapper", "LegacyDDPMDiscretization", "LinearMultistepSampler", "LinearPredictionGuider",
    "NoDynamicThresholding", "SAMPLERS", "StandardDiffusionLoss", "SubstepSampler", "TrianglePredictionGuider",
    "Txt2NoisyDiscretizationWrapper", "UnitWeighting", "VScaling", "VScalingWithEDMcNoise", "VWeighting",
    "VanillaCFG", "append_dims", "get_sampler", "instantiate_from_config",
]
