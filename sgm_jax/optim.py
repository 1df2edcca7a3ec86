"""The optimiser and the EMA of the weights, as the seed's configure_optimizers and LitEma."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from sgm_jax.errors import UserError


def seed_optimizer(optimizer_config: Mapping[str, Any] | None, learning_rate: float | optax.Schedule
                   ) -> optax.GradientTransformation:
    """The seed's `optimizer_config` ({target, params}, torch's names) as optax.

    torch.optim.AdamW (DiffusionEngine's default; decoupled weight decay, default 0.01) or
    torch.optim.Adam (AutoencodingEngine's; its weight_decay is L2 added to the gradient, default 0).
    params: betas (0.9, 0.999), eps 1e-8, weight_decay."""
    cfg = dict(optimizer_config or {"target": "torch.optim.AdamW"})
    name = str(cfg.get("target", "torch.optim.AdamW")).rsplit(".", 1)[-1]
    p = dict(cfg.get("params", {}) or {})
    b1, b2 = (float(b) for b in p.pop("betas", (0.9, 0.999)))
    eps = float(p.pop("eps", 1e-8))
    if name == "Adam":
        wd = float(p.pop("weight_decay", 0.0))
        tx = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
        tx = optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx
    elif name == "AdamW":
        tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=float(p.pop("weight_decay", 0.01)))
    else:
        raise UserError(f"optimizer_config target {cfg.get('target')!r} is not supported (torch.optim.Adam / AdamW)")
    if p:
        raise UserError(f"optimizer_config params {sorted(p)} are not supported (betas, eps, weight_decay)")
    return tx


def make_optimizer(learning_rate: float | optax.Schedule, trainable: Any = None, *,
                   optimizer_config: Mapping[str, Any] | None = None, grad_clip: float = 0.0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """The optimiser of every trainer: the seed's `optimizer_config` (seed_optimizer; default
    torch.optim.AdamW with torch's defaults, as the seed's configure_optimizers) after gradient
    clipping by global norm (lightning's gradient_clip_val; 0 = none).

    `learning_rate`: a float (with an optional linear warm-up) or an optax schedule
    (schedules.learning_rate_schedule). `trainable`: None, or a pytree of bools shaped like the
    params whose False leaves get zero updates (the seed passes only the UNet and trainable
    embedders). Gradient accumulation happens in the train step, before this optimiser sees the mean.
    """
    schedule = learning_rate
    if warmup_steps > 0 and not callable(learning_rate):
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    tx = optax.chain(*parts, seed_optimizer(optimizer_config, schedule))  # (a chain even of one: checkpoints' layout)
    if trainable is None:
        return tx
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                 jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable))


def ema_decay(num_updates: jax.Array, decay: float) -> jax.Array:
    """LitEma's warm-up: min(decay, (1 + n) / (10 + n)), n counting this update."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
