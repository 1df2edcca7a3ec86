"""configs/sdxl_finetune.py's recipe on tiny_sdxl (64 px, batch 8, no buckets), FSDP over every
device of every host; the converted weights and the shards come from --config overrides."""

from sgm_jax import parallel
from sgm_jax.configs import sdxl_finetune
from sgm_jax.configs.inference import tiny_sdxl

parallel.MIN_FSDP_SIZE = 1024  # split even this tiny UNet's larger kernels over the hosts


def get_config():
    config = sdxl_finetune.finetune(tiny_sdxl.model(), name="tiny_finetune", size=64, buckets=(), batch_size=8,
                                    lr=1e-3, sample_steps=2)
    config.data.params.train.loader.num_workers = 0
    config.training.update(max_steps=2, checkpoint_every=2, log_every=1, sample_every=0, dtype="float32",
                           checkpoint_async=False, report_flops=False)
    return config
