"""LoRA's parameter trees (`config.lora`), for the trainer and for sampling a workdir alike.

    config.lora = {"rank": 4, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out_0"]}

A LoRA run's trainable params are `{"lora": adapters}` (sgm_jax.lora.LoraPair per adapted UNet
kernel); the whole engine (UNet, text towers, first stage) is the frozen base, from
model.params.ckpt_path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from sgm_jax.diffusion.registry import to_plain
from sgm_jax.errors import UserError
from sgm_jax.lora import ATTENTION_TARGETS, LoraPair, init_adapters, merge_adapters

from .frozen import load_frozen_and_initial, merge_params, split_params

LORA = "lora"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """config.lora, resolved once: adapters of `rank` on the UNet's `target_modules`, scaled alpha / rank."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def lora_settings(config: Any) -> LoraSpec | None:
    """config.lora (a training config or a workdir's config.json), or None when LoRA training is
    off (no section, or rank 0). alpha defaults to the rank, targets to the attention projections."""
    lora = to_plain(config.get("lora")) if isinstance(config, Mapping) or hasattr(config, "get") else None
    if not lora or int(lora.get("rank", 0)) <= 0:
        return None
    return LoraSpec(int(lora["rank"]), float(lora.get("alpha") or lora["rank"]),
                    tuple(lora.get("target_modules") or ATTENTION_TARGETS))


def new_adapters(base_params: Mapping[str, Any], lora: LoraSpec, key: jax.Array) -> dict[str, Any]:
    """{"lora": fresh adapters} for the base engine tree (only its shapes are read)."""
    try:
        return {LORA: init_adapters(base_params, lora.rank, lora.alpha, lora.target_modules, key=key)}
    except ValueError as e:
        raise UserError(f"config.lora: {e}") from None


def lora_base(engine: Any, initial: Any, frozen: Mapping[str, Any], seed: int, example: Mapping[str, Any]) -> dict:
    """The frozen base of the adapters: the whole engine tree, as loaded (model.params.ckpt_path)
    or, without a checkpoint, the random initialisation of `seed` (the same on every call)."""
    if initial is None:
        initial = split_params(engine, jax.device_get(engine.init_params(jax.random.key(seed), example)))[0]
    return merge_params(initial, frozen)


def with_adapters(trainable: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The engine tree the networks read: base kernels + alpha / r * down @ up (differentiable)."""
    return merge_adapters(base, trainable[LORA])


def frozen_parts(engine: Any, config: Any, abstract_full: Mapping[str, Any], example: Mapping[str, Any],
                 lora: LoraSpec | None) -> tuple[dict | None, dict]:
    """(initial trainable params or None, frozen params) of a training config, for the trainer and
    for sampling a workdir alike: frozen.load_frozen_and_initial, or with a LoRA (lora_settings)
    the whole engine as the adapters' frozen base (and no initial params: adapters start fresh)."""
    initial, frozen = load_frozen_and_initial(engine, config["model"], abstract_full)
    if lora is None:
        return initial, frozen
    return None, lora_base(engine, initial, frozen, int(config["training"]["seed"]), example)


def full_params(lora: LoraSpec | None, trainable: Mapping[str, Any], frozen: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    """The engine tree the networks read from the trained and the frozen parts (frozen_parts)."""
    return with_adapters(trainable, frozen) if lora is not None else merge_params(trainable, frozen)


def as_pairs(tree: Mapping[str, Any], alpha: float) -> Any:
    """Checkpointed adapters (plain {"down", "up"} dicts: alpha is static, not stored) back
    into LoraPairs, alpha from the config."""
    if set(tree) == {"down", "up"}:
        return LoraPair(jax.numpy.asarray(tree["down"]), jax.numpy.asarray(tree["up"]), alpha)
    return {k: as_pairs(v, alpha) for k, v in tree.items()}
