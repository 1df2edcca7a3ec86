"""The jit-compiled train step: conditioner + denoiser + loss + AdamW update + EMA."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from sgm_jax.checkpointing.frozen import merge_params
from sgm_jax.engine import DiffusionEngine
from sgm_jax.optim import ema_decay, ema_update

from .state import TrainState


def make_train_step(engine: DiffusionEngine, tx: optax.GradientTransformation, *, ema_rate: float | None = None,
                    full_params: Callable[[Any, Any], Any] | None = None, grad_accum: int = 1) -> Callable[..., tuple]:
    """Returns `train_step(state, batch, key, frozen=None) -> (state, metrics)` (not yet jitted).

    `key` is this step's randomness; the loop derives it as `fold_in(base_key, step)`, so a
    resumed run draws exactly what an uninterrupted one would. `frozen`: the parts that are
    not trained (first stage, frozen embedders, a LoRA's base weights); `full_params(trainable,
    frozen)` builds the engine's tree from both (default: frozen.merge_params). Gradients,
    optimiser state and EMA cover the trainable tree only.

    `grad_accum` k > 1: `batch` holds k micro-batches stacked on a leading axis and one call is
    one optimiser step, as Lightning's accumulate_grad_batches: the mean of the k micro-batch
    gradients (micro-batch i draws with `fold_in(key, i)`), `state.step` counting optimiser
    steps like the seed's global_step. The EMA updates after every micro-batch, as LitEma in the
    seed's on_train_batch_end: k - 1 times towards the weights before the update, then towards
    the new ones; its warm-up counts micro-batches (LitEma's num_updates).
    """

    combine = full_params or merge_params

    def train_step(state: TrainState, batch: Mapping[str, Any], key: jax.Array, frozen: Any = None):
        def loss_fn(params, micro, micro_key):
            return engine.loss(combine(params, frozen), micro, micro_key)[0]

        grad_fn = jax.value_and_grad(loss_fn)
        if grad_accum == 1:
            loss, grads = grad_fn(state.params, batch, key)
        else:
            def micro_step(total, xs):  # one micro-batch's activations live at a time
                micro, i = xs
                loss_i, grads_i = grad_fn(state.params, micro, jax.random.fold_in(key, i))
                return jax.tree_util.tree_map(jnp.add, total, (loss_i, grads_i)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            total, _ = jax.lax.scan(micro_step, zero, (batch, jnp.arange(grad_accum)))
            loss, grads = jax.tree_util.tree_map(lambda t: t / grad_accum, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_rate is not None:
            seen = state.step * grad_accum  # micro-batches before this step
            for i in range(1, grad_accum):
                ema = ema_update(ema, state.params, ema_decay(seen + i, ema_rate))
            ema = ema_update(ema, params, ema_decay(seen + grad_accum, ema_rate))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return train_step


def init_train_state(params: Any, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None)
