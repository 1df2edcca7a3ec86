"""LoRA fine-tune of SDXL 1.0 base: sdxl_finetune's data, conditioning and sampler, but only
rank-16 adapters on the UNet's attention projections train (the optimiser state and every
checkpoint hold the adapters alone, ~23 M parameters); the whole converted model is the frozen base.

The frozen base, the whole engine, is held in bfloat16 (6.5 GiB; 12.9 in float32). Data-parallel over every device
(batch 4 of 1024 px in all, with remat): on a v5e-4, one image per chip, XLA:TPU needs 9.79 of 16 GiB per chip;
all 4 on one v6e chip 11.51 of 32 (`python -m sgm_jax.compile_check --config sdxl_lora --topology v5e:2x2`;
benchmarks/RESULTS.md).

    python train.py --config configs/sdxl_lora.py --config.model.params.ckpt_path=checkpoints/sd_xl_base \
        --config.data.params.train.datapipeline.urls='shards/data-*.tar'
    python -m sgm_jax.training.lora_training workdir/sdxl_lora my_lora.safetensors    # kohya-ss layout
    python sample.py --config configs/inference/sd_xl_base.py --checkpoint checkpoints/sd_xl_base \
        --lora my_lora.safetensors:0.8 --prompt "..."
"""

from sgm_jax.configs import sdxl_finetune
from sgm_jax.configs.inference import sd_xl_base


def get_config():
    config = sdxl_finetune.finetune(sd_xl_base.model(), name="sdxl_lora", size=1024, batch_size=4, lr=1.0e-4)
    config.lora = {"rank": 16, "alpha": 16.0, "target_modules": ["to_q", "to_k", "to_v", "to_out_0"]}
    config.mesh = {"data": -1, "fsdp": 1, "collective_matmul": True}
    # the base computes in bfloat16 either way; held in float32 it made the step 15.78 GiB per v5e chip at one
    # image each, over the 15.75 XLA:TPU can use; in bfloat16 9.79 (benchmarks/RESULTS.md)
    config.training.frozen_dtype = "bfloat16"
    return config
