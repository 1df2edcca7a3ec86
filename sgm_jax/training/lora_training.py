"""LoRA fine-tuning of a DiffusionEngine (`config.lora`): only adapters train.

    config.lora = {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out_0"]}

The trained state's params are `{"lora": adapters}` (sgm_jax.checkpointing.lora_params), so the
optimiser state, the EMA and every checkpoint hold the adapters alone.
`export_workdir(workdir, out)` writes the trained adapters as a kohya-ss LoRA file that
sample.py --lora, the demo and other tools load.
"""

from __future__ import annotations

from pathlib import Path

from sgm_jax.checkpointing.checkpoint import restore_params
from sgm_jax.checkpointing.lora_params import LORA, as_pairs, lora_settings
from sgm_jax.checkpointing.workdirs import read_workdir_config
from sgm_jax.errors import UserError, run_cli
from sgm_jax.lora import export_kohya


def export_workdir(workdir: str | Path, out: str | Path, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """The trained adapters of a LoRA train.py workdir as a kohya-ss `.safetensors`."""
    workdir = Path(workdir)
    config = read_workdir_config(workdir)
    lora = lora_settings(config)
    if lora is None:
        raise UserError(f"{workdir} did not train a LoRA (its config has no lora section)")
    _, params = restore_params(workdir / "checkpoints", use_ema=use_ema)
    if LORA not in params:
        raise UserError(f"the checkpoints in {workdir} hold no adapters")
    return export_kohya(as_pairs(params[LORA], lora.alpha), out, overwrite=overwrite,
                        metadata={"ss_output_name": workdir.name, "sgm_jax_workdir": str(workdir)})


def main(argv: list[str] | None = None) -> None:
    """python -m sgm_jax.training.lora_training WORKDIR OUT.safetensors [--raw] [--overwrite]"""
    import argparse

    p = argparse.ArgumentParser(description="export a LoRA workdir's adapters in the kohya-ss layout")
    p.add_argument("workdir")
    p.add_argument("out")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    run_cli(lambda: print(export_workdir(args.workdir, args.out, use_ema=not args.raw, overwrite=args.overwrite)))


if __name__ == "__main__":
    main()
