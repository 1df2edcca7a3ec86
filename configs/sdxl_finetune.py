"""Fine-tune SDXL 1.0 base on your captioned images: the UNet trains (FSDP over every device,
bf16 compute, remat per block), the VAE and both text towers stay frozen (loaded from the
converted checkpoint, never written into training checkpoints), SDXL's size / crop / target
micro-conditioning and aspect buckets come from the data, and the sample grids use the seed's
sampler (EulerEDM, 50 steps, CFG 5) over `training.sample_prompts`.

Sized for one host of 8 accelerators with >= 40 GB each (H100 / A100-80G / TPU v5p-8): the
2.6 B-parameter UNet in float32 with AdamW is ~42 GB of state, split over the 8 devices by FSDP;
batch 32 of 1024 px (4 per device). XLA:TPU's compile for 4 v5p chips (v5p-8, batch 8 per chip) needs 20.6 GiB
per chip: 8.0 GiB of state and frozen parts, 12.2 GiB of activations (`python -m sgm_jax.compile_check --config
sdxl_finetune --topology v5p:2x2x1`; benchmarks/RESULTS.md). A larger slice: the same config with a global batch that
divides over its chips (`--config.data.params.train.loader.batch_size=256` on 64 chips: 17.6 GiB per chip).

    python convert_torch_weights.py --config configs/inference/sd_xl_base.py \
        --checkpoint sd_xl_base_1.0.safetensors --output checkpoints/sd_xl_base
    python prepare_data.py my_images/ shards/ --samples-per-shard 1000      # image + same-name .txt
    python train.py --config configs/sdxl_finetune.py \
        --config.model.params.ckpt_path=checkpoints/sd_xl_base \
        --config.data.params.train.datapipeline.urls='shards/data-*.tar'
    python sample.py --workdir workdir/sdxl_finetune --prompt "..."
"""

from ml_collections import ConfigDict

from sgm_jax.configs import _training_parts as T
from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import sd_xl_base

# SDXL's training buckets: (height, width), from the seed demo's SD_XL_BASE_RATIOS (width, height)
BUCKETS = tuple((h, w) for w, h in P.SDXL_RESOLUTIONS)


def finetune(model: dict, *, name: str, size: int, buckets=BUCKETS, batch_size: int = 32, lr: float = 1.0e-5,
             text_ucg_rate: float = 0.1, sample_steps: int = 50) -> ConfigDict:
    """A fine-tune of an inference config's `model` (sd_xl_base, tiny_sdxl, ...): UNet trains,
    everything else is frozen; captions dropped with `text_ucg_rate` for classifier-free guidance."""
    params = model["params"]
    for spec in params["conditioner_config"]["params"]["emb_models"]:
        spec["is_trainable"] = False
        if spec["input_key"] == "txt":
            spec["ucg_rate"] = text_ucg_rate
    params["network_config"]["params"]["use_checkpoint"] = True  # remat: activation memory per block
    params["first_stage_config"]["params"]["ckpt_path"] = ""  # from model.params.ckpt_path unless set
    # a training batch is split over the devices: the inference configs' one-image-at-a-time VAE is for one chip
    params["en_and_decode_n_samples_a_time"] = None
    params.update(ckpt_path="", loss_fn_config=T.eps_loss(), scheduler_config=T.lambda_linear(500),
                  sampler_config=T.euler_sampler(sample_steps, 5.0), use_ema=False)
    model["base_learning_rate"] = lr
    config = ConfigDict()
    config.model = model
    # a 1,000-sample shuffle window: 10,000 compressed 1024 px images would hold 5-10 GB per worker
    config.data = T.streaming_data(T.image_datapipeline(size, aspect_buckets=buckets, shuffle=1000),
                                   batch_size=batch_size)
    config.training = T.seed_lightning_training(
        name, max_steps=10000, checkpoint_every=1000, sample_every=500, num_samples=4, sample_nrow=4,
        grad_clip=1.0, sample_prompts=("a photograph of an astronaut riding a horse", "a watercolor of a fox",
                                       "a bowl of ramen, studio lighting", "a city street at night in the rain"))
    # FSDP over every device; on TPU the weights' plain all-gathers, not XLA's collective-matmul loops, which
    # re-read each activation once per weight shard (parallel.compiler_options; benchmarks/RESULTS.md, v6e-8)
    config.mesh = {"data": 1, "fsdp": -1, "collective_matmul": False}
    return config


def get_config() -> ConfigDict:
    return finetune(sd_xl_base.model(), name="sdxl_finetune", size=1024)
