"""The jit-compiled train step: conditioner + denoiser + loss + AdamW update + EMA."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from sgm_jax.engine import DiffusionEngine

from .state import TrainState, ema_decay, ema_update


def make_train_step(engine: DiffusionEngine, tx: optax.GradientTransformation, *, ema_rate: float | None = None,
                    full_params: Callable[[Any, Any], Any] | None = None) -> Callable[..., tuple]:
    """Returns `train_step(state, batch, key, frozen=None) -> (state, metrics)` (not yet jitted).

    `key` is this step's randomness; the loop derives it as `fold_in(base_key, step)`, so a
    resumed run draws exactly what an uninterrupted one would. `frozen`: the parts that are
    not trained (first stage, frozen embedders, a LoRA's base weights); `full_params(trainable,
    frozen)` builds the engine's tree from both (default: frozen.merge_params). Gradients,
    optimiser state and EMA cover the trainable tree only.
    """
    from .frozen import merge_params

    combine = full_params or merge_params

    def train_step(state: TrainState, batch: Mapping[str, Any], key: jax.Array, frozen: Any = None):
        def loss_fn(params):
            mean, per_example = engine.loss(combine(params, frozen), batch, key)
            return mean, per_example

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_rate is not None:
            ema = ema_update(ema, params, ema_decay(state.step + 1, ema_rate))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        metrics = {"loss": loss, "grad_norm": grad_norm}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return train_step


def init_train_state(params: Any, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None)
