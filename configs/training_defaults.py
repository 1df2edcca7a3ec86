"""Every training default in one place: `config.training` of every config starts here.

    from sgm_jax.configs import training_defaults
    config.training = training_defaults.training(name="my_run", max_steps=10_000, dtype="bfloat16")

The loop (sgm_jax/training/loop.py) reads these fields and nothing else of config.training
without a config default; a config that builds its own training section must hold them all.
"""

from __future__ import annotations

from typing import Any


def training(**overrides: Any) -> dict[str, Any]:
    """config.training: what the seed's lightning section sets, plus the JAX loop's own knobs."""
    t = dict(
        name="run",             # names the run in sample metadata
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
        sample_classes=(),      # class-conditioned models: what a sample grid shows (cycled); () = the data's own labels
        sample_prompts=(),      # for text-conditioned models: the prompts of the grid (cycled)
        eval_every=0,           # run the task's held-out evaluation every N steps (0 = never)
        max_nonfinite_steps=10, # skip this many non-finite updates in a row, then stop with an error
        log_every=50,
        tokenizer="",           # CLIP BPE file / tokenizer folder for text embedders ("" = the usual places)
        report_flops=True,      # log tflops_per_device (XLA cost analysis of the step, traced once more)
        profile_steps=(),       # (first, last): a jax.profiler trace of those steps in <workdir>/profile
        dtype="float32",        # compute dtype of the networks (bfloat16 on accelerators)
        frozen_dtype="float32", # the frozen parts held on the devices (first stage, frozen embedders, a LoRA's
                                # base): "bfloat16" halves their memory (they compute in `dtype` anyway)
        grad_clip=0.0,          # lightning.trainer.gradient_clip_val (the optimiser: model.params.optimizer_config)
        grad_accum=1,           # lightning.trainer.accumulate_grad_batches
        warmup_steps=0,
    )
    t.update(overrides)
    return t
