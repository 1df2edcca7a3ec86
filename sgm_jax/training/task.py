"""What the training loop needs from a kind of model (diffusion, autoencoder, ...): a Task.

The loop (loop.py) owns everything generic: config checks, mesh and shardings, data
iterators, the jit of the step, the finite-update guard, Orbax checkpoints with the data
iterator's state, metrics, signals, locks. A Task owns what is specific to a model family,
as vdm's `Experiment` hooks: how to build and initialise its state, one train step, what a
sample grid shows, and held-out evaluation. `Task` names every hook the loop calls and gives
the defaults; a family overrides what it has. Tasks are chosen by `config.model.target`
(the seed's class name) through tasks.py.

Every hook is called on every host; only host 0 writes files.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

Batch = Mapping[str, np.ndarray]


class Task:
    """The hooks the training loop calls, in the order it calls them, with their defaults."""

    name = "task"
    # training.grad_accum > 1 is allowed: the loop then feeds the step k stacked micro-batches [k, B, ...]
    accumulates_gradients = False

    def __init__(self, config: Any, dataset: Any):
        """No arrays allocated yet: the loop builds shardings from abstract shapes first."""
        self.config, self.dataset = config, dataset

    def prepare_batch(self, batch: Batch) -> Batch:
        """A host batch as the step reads it (e.g. captions -> token ids); runs outside jit."""
        return batch

    def init_state(self, key: jax.Array, example_batch: Batch) -> Any:
        """A random state; pure (the loop eval_shapes and jits it). A flax.struct dataclass with
        a scalar int `step` field: what checkpoints hold (frozen parts stay outside it)."""
        raise NotImplementedError(f"{type(self).__name__}.init_state")

    def initial_params(self, example_batch: Batch) -> Any:
        """The trainable params a fine-tune starts from, or None to start from init_state."""
        return None

    def init_state_from(self, trainable: Any) -> Any:
        """The state around given trainable params (called when initial_params gave some); pure."""
        raise NotImplementedError(f"{type(self).__name__}.init_state_from")

    def frozen_params(self, example_batch: Batch, place: Callable[[Any], Any]) -> Any:
        """Weights the step reads but never trains (first stage, frozen text towers), placed on
        the devices by `place(tree)`; passed to train_step as `frozen`. None: there are none."""
        return None

    def frozen_shapes(self, example_batch: Batch) -> Any:
        """jax.ShapeDtypeStructs of what frozen_params would load, loading nothing (the compile check)."""
        return None

    def train_step(self, state: Any, batch: Batch, key: jax.Array, frozen: Any = None
                   ) -> tuple[Any, dict[str, jax.Array]]:
        """One update; pure, jitted by the loop (state donated). `key` is already folded with the
        step. Metrics: float32 scalars holding "loss" (and "grad_norm" when there is one: the
        loop's guard skips an update where either is not finite)."""
        raise NotImplementedError(f"{type(self).__name__}.train_step")

    def log_images(self, state: Any, step: int) -> dict[str, Any]:
        """Grids to write as samples/<name>_step_<N>.png ("" = samples/step_<N>.png); {} = none."""
        return {}

    def evaluate(self, state: Any, step: int) -> dict[str, float]:
        """Held-out metrics every training.eval_every steps, logged as eval/<name>; {} = none."""
        return {}
