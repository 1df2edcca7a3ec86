"""The seed's toy/mnist_cond_discrete_eps.yaml: DDPM eps-prediction with 1000 discrete levels, CFG 5."""

from sgm_jax.configs import mnist_cond

SEED = mnist_cond.SEED
DDPM = {"target": f"{SEED}.discretizer.LegacyDDPMDiscretization"}


def get_config():
    config = mnist_cond.get_config()
    p = config.model.params
    p.denoiser_config = {"target": f"{SEED}.denoiser.DiscreteDenoiser", "params": {
        "num_idx": 1000, "scaling_config": {"target": f"{SEED}.denoiser_scaling.EpsScaling"},
        "discretization_config": DDPM}}
    p.loss_fn_config = {"target": f"{SEED}.loss.StandardDiffusionLoss", "params": {
        "loss_weighting_config": {"target": f"{SEED}.loss_weighting.EDMWeighting"},
        "sigma_sampler_config": {"target": f"{SEED}.sigma_sampling.DiscreteSampling",
                                 "params": {"num_idx": 1000, "discretization_config": DDPM}}}}
    p.sampler_config.params.discretization_config = DDPM
    p.sampler_config.params.guider_config.params.scale = 5.0
    config.training.name = "mnist_cond_discrete_eps"
    return config
