"""The seed's configs/example_training/autoencoder/kl-f4/imagenet-attnfree-logvar.yaml:
an attention-free f4 KL autoencoder (4 latent channels) with a learned output log-variance,
LPIPS (weight 0.25) and a PatchGAN from step 20001 (adaptive weight x 0.5), on 256 px images.

    python -m sgm_jax.convert.lpips --vgg vgg16-397923af.pth     # once: LPIPS weights
    python train.py --config configs/autoencoder_kl_f4.py --config.data.params.train.datapipeline.urls='("/data/shards/{000000..000999}.tar",)'

Sized for accelerators (batch 8 per the seed's single device; 2 x 55M parameters + VGG16).
"""

from ml_collections import ConfigDict, config_dict

from sgm_jax.configs import training_defaults

ENCODER = "sgm.modules.diffusionmodules.model.Encoder"
DECODER = "sgm.modules.diffusionmodules.model.Decoder"


def ddconfig(**overrides):
    """encoder_config.params (the yaml's decoder_config.params is the same mapping)."""
    p = dict(attn_type="none", double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
             ch_mult=(1, 2, 4), num_res_blocks=4, attn_resolutions=(), dropout=0.0)
    p.update(overrides)
    return p


def loss_config(**overrides):
    p = dict(perceptual_weight=0.25, disc_start=20001, disc_weight=0.5, learn_logvar=True,
             regularization_weights={"kl_loss": 1.0})
    p.update(overrides)
    return {"target": "sgm.modules.autoencoding.losses.GeneralLPIPSWithDiscriminator", "params": p}


def model(base_learning_rate=4.5e-6, encoder=None, loss=None, **params):
    enc = encoder or ddconfig()
    p = {
        "input_key": "jpg",
        "monitor": "val/rec_loss",
        "ema_decay": config_dict.placeholder(float),  # the seed's AbstractAutoencoder: None = no EMA
        "disc_start_iter": 0,
        "lr_g_factor": 1.0,
        "optimizer_config": {"target": "torch.optim.Adam", "params": {"betas": (0.9, 0.999)}},
        "loss_config": loss or loss_config(),
        "regularizer_config": {"target": "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer"},
        "encoder_config": {"target": ENCODER, "params": dict(enc)},
        "decoder_config": {"target": DECODER, "params": dict(enc)},
    }
    p.update(params)
    return {"base_learning_rate": base_learning_rate, "target": "sgm.models.autoencoder.AutoencodingEngine",
            "params": p}


def webdataset(urls=("DATA-PATH",), size=256, batch_size=8):
    """The yaml's data section: tar shards, Resize(256, bicubic), ToTensor, Rescaler, square crop."""
    return {"target": "sgm.data.dataset.StableDataModuleFromConfig", "params": {"train": {
        "datapipeline": {
            "urls": tuple(urls),
            "pipeline_config": {"shardshuffle": 10000, "sample_shuffle": 10000, "num_streams": 0},
            "decoders": ("pil",),
            "postprocessors": (
                {"target": "sdata.mappers.TorchVisionImageTransforms", "params": {"key": "jpg", "transforms": (
                    {"target": "torchvision.transforms.Resize", "params": {"size": size, "interpolation": 3}},
                    {"target": "torchvision.transforms.ToTensor"})}},
                {"target": "sdata.mappers.Rescaler"},
                {"target": "sdata.mappers.AddOriginalImageSizeAsTupleAndCropToSquare",
                 "params": {"h_key": "height", "w_key": "width"}},
            )},
        "loader": {"batch_size": batch_size, "num_workers": 4}}},
        "allow_changed_shards": False}  # True: resume on shards replaced under their names, with a warning


def training(**overrides):
    """The yaml's lightning section (checkpoints every 5000 steps, images every 1000, 8 of
    them) plus the autoencoder's own knobs (sgm_jax/training/autoencoder_task.py, sgm_jax/autoencoding/step.py)."""
    t = training_defaults.training(name="autoencoder_kl_f4", max_epochs=1, checkpoint_every=5000, sample_every=1000,
                                   num_samples=8, sample_nrow=4, eval_every=10000)
    t.update(optimizer_order="sequential",  # "alternate": the seed's one-optimizer-per-batch training_step
             lpips_train_dropout=True,      # the seed trains with LPIPS' Dropout(0.5) on (Lightning's .train())
             eval_examples=256, eval_batch_size=32)
    t.update(overrides)
    return t


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.data = webdataset()
    config.training = training()
    config.mesh = {"data": -1, "fsdp": 1, "collective_matmul": True}
    return config
