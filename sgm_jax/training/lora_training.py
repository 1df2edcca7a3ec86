"""LoRA fine-tuning of a DiffusionEngine (`config.lora`): only adapters train.

    config.lora = {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out_0"]}

The trained state's params are `{"lora": adapters}` (sgm_jax.lora.LoraPair per adapted UNet
kernel), so the optimiser state, the EMA and every checkpoint hold the adapters alone; the
whole engine (UNet, text towers, first stage) is the frozen base, from model.params.ckpt_path.
`export_workdir(workdir, out)` writes the trained adapters as a kohya-ss LoRA file that
sample.py --lora, the demo and other tools load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax

from sgm_jax.errors import UserError
from sgm_jax.lora import ATTENTION_TARGETS, export_kohya, init_adapters, merge_adapters

LORA = "lora"


def lora_settings(config: Any) -> dict | None:
    """config.lora as a dict, or None when LoRA training is off (no section, or rank 0)."""
    from sgm_jax.diffusion.registry import to_plain

    lora = to_plain(config.get("lora")) if hasattr(config, "get") else None
    if not lora or int(lora.get("rank", 0)) <= 0:
        return None
    return {"rank": int(lora["rank"]), "alpha": float(lora.get("alpha") or lora["rank"]),
            "target_modules": tuple(lora.get("target_modules") or ATTENTION_TARGETS)}


def new_adapters(base_params: Mapping[str, Any], lora: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
    """{"lora": fresh adapters} for the base engine tree (only its shapes are read)."""
    try:
        return {LORA: init_adapters(base_params, lora["rank"], lora["alpha"], lora["target_modules"], key=key)}
    except ValueError as e:
        raise UserError(f"config.lora: {e}") from None


def lora_base(engine: Any, initial: Any, frozen: Mapping[str, Any], seed: int, example: Mapping[str, Any]) -> dict:
    """The frozen base of the adapters: the whole engine tree, as loaded (model.params.ckpt_path)
    or, without a checkpoint, the random initialisation of `seed` (the same on every call)."""
    from .frozen import merge_params, split_params

    if initial is None:
        initial = split_params(engine, jax.device_get(engine.init_params(jax.random.key(seed), example)))[0]
    return merge_params(initial, frozen)


def with_adapters(trainable: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The engine tree the networks read: base kernels + alpha / r * down @ up (differentiable)."""
    return merge_adapters(base, trainable[LORA])


def frozen_parts(engine: Any, config: Any, abstract_full: Mapping[str, Any], example: Mapping[str, Any]
                 ) -> tuple[dict | None, dict]:
    """(initial trainable params or None, frozen params) of a training config, for the trainer and
    for sampling a workdir alike: frozen.load_frozen_and_initial, or with `config.lora` the whole
    engine as the adapters' frozen base (and no initial params: adapters start fresh)."""
    from .frozen import load_frozen_and_initial

    initial, frozen = load_frozen_and_initial(engine, config["model"], abstract_full)
    if lora_settings(config) is None:
        return initial, frozen
    return None, lora_base(engine, initial, frozen, int(config["training"]["seed"]), example)


def full_params(config: Any, trainable: Mapping[str, Any], frozen: Mapping[str, Any] | None) -> dict[str, Any]:
    """The engine tree the networks read from the trained and the frozen parts (frozen_parts)."""
    from .frozen import merge_params

    return with_adapters(trainable, frozen) if lora_settings(config) is not None else merge_params(trainable, frozen)


def export_workdir(workdir: str | Path, out: str | Path, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """The trained adapters of a LoRA train.py workdir as a kohya-ss `.safetensors`."""
    from sgm_jax.inference.workdir import read_workdir_config

    from .checkpoint import restore_params

    workdir = Path(workdir)
    config = read_workdir_config(workdir)
    lora = lora_settings(config)
    if lora is None:
        raise UserError(f"{workdir} did not train a LoRA (its config has no lora section)")
    _, params = restore_params(workdir / "checkpoints", use_ema=use_ema)
    if LORA not in params:
        raise UserError(f"the checkpoints in {workdir} hold no adapters")
    return export_kohya(as_pairs(params[LORA], lora["alpha"]), out, overwrite=overwrite,
                        metadata={"ss_output_name": workdir.name, "sgm_jax_workdir": str(workdir)})


def as_pairs(tree: Mapping[str, Any], alpha: float) -> Any:
    """Checkpointed adapters (plain {"down", "up"} dicts: alpha is static, not stored) back
    into LoraPairs, alpha from the config."""
    from sgm_jax.lora import LoraPair

    if set(tree) == {"down", "up"}:
        return LoraPair(jax.numpy.asarray(tree["down"]), jax.numpy.asarray(tree["up"]), alpha)
    return {k: as_pairs(v, alpha) for k, v in tree.items()}


def main(argv: list[str] | None = None) -> None:
    """python -m sgm_jax.training.lora_training WORKDIR OUT.safetensors [--raw] [--overwrite]"""
    import argparse

    from sgm_jax.errors import run_cli

    p = argparse.ArgumentParser(description="export a LoRA workdir's adapters in the kohya-ss layout")
    p.add_argument("workdir")
    p.add_argument("out")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    run_cli(lambda: print(export_workdir(args.workdir, args.out, use_ema=not args.raw, overwrite=args.overwrite)))


if __name__ == "__main__":
    main()
