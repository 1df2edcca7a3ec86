"""sdxl_finetune's recipe (UNet trains with FSDP over every chip, remat, frozen VAE and text towers)
on micro_sdxl's model, 32 px, batch 8: the compile-check tests' training step."""

import importlib.util
from pathlib import Path

from sgm_jax.configs import sdxl_finetune

_spec = importlib.util.spec_from_file_location("_micro_sdxl", Path(__file__).with_name("micro_sdxl.py"))
micro_sdxl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(micro_sdxl)


def get_config():
    return sdxl_finetune.finetune(micro_sdxl.model(), name="micro_sdxl_finetune", size=32, buckets=((32, 32),),
                                  batch_size=8)
