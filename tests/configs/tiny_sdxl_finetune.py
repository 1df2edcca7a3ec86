"""configs/sdxl_finetune.py's recipe on micro_sdxl (64 px, batch 8, no buckets, no remat), FSDP over
every device of every host; the converted weights and the shards come from --config overrides."""

from pathlib import Path

from sgm_jax import parallel
from sgm_jax.cli.configs import load_config
from sgm_jax.configs import sdxl_finetune

parallel.MIN_FSDP_SIZE = 1024  # split even this tiny UNet's larger kernels over the hosts


def get_config():
    micro = load_config(str(Path(__file__).with_name("micro_sdxl.py"))).model.to_dict()
    config = sdxl_finetune.finetune(micro, name="tiny_finetune", size=64, buckets=(), batch_size=8, lr=1e-3,
                                    sample_steps=2)
    config.model.params.network_config.params.use_checkpoint = False  # remat: compile time, not what is tested
    config.data.params.train.loader.num_workers = 0
    config.training.update(max_steps=2, checkpoint_every=2, log_every=1, sample_every=0, dtype="float32",
                           checkpoint_async=False, report_flops=False)
    return config
