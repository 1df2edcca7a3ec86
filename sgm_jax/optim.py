"""The optimiser and the EMA of the weights, as the seed's configure_optimizers and LitEma."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_optimizer(learning_rate: float | optax.Schedule, trainable: Any, *, weight_decay: float = 0.01,
                   grad_clip: float = 0.0, warmup_steps: int = 0) -> optax.GradientTransformation:
    """AdamW with torch's defaults (the seed's optimizer_config default is torch.optim.AdamW).

    `learning_rate`: a float (with an optional linear warm-up) or an optax schedule
    (schedules.learning_rate_schedule). `trainable`: pytree of bools shaped like the params;
    frozen leaves get zero updates (the seed passes only the UNet and trainable embedders).
    Gradient accumulation happens in the train step (step.py), before this optimiser sees the mean.
    """
    schedule = learning_rate
    if warmup_steps > 0 and not callable(learning_rate):
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.multi_transform(
        {"train": optax.chain(*parts), "freeze": optax.set_to_zero()},
        jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable),
    )


def ema_decay(num_updates: jax.Array, decay: float) -> jax.Array:
    """LitEma's warm-up: min(decay, (1 + n) / (10 + n)), n counting this update."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
