"""What the training loop needs from a kind of model (diffusion, autoencoder, ...): a Task.

The loop (loop.py) owns everything generic: config checks, mesh and shardings, data
iterators, the jit of the step, the finite-update guard, Orbax checkpoints with the data
iterator's state, metrics, signals, locks. A Task owns what is specific to a model family,
as vdm's trainer hooks: how to build and initialise its state, one train step, what a
sample grid shows, and held-out evaluation. Tasks are chosen by `config.model.target`
(the seed's class name) through `TASKS`.

Contract (every method is called on every host; only host 0 writes files):

    task = TaskClass(config, dataset)            # no arrays allocated yet
    task.init_state(key, example_batch) -> state # pure; the loop jits / eval_shapes it.
        `state` is a flax.struct dataclass with a scalar int `step` field; it is what
        checkpoints hold (frozen parts that never change stay outside it).
    task.train_step(state, batch, key) -> (state, metrics)
        pure, jitted by the loop (state donated). `key` is already folded with the step.
        `metrics`: dict of float32 scalars; must hold "loss" (the guard checks it, and
        "grad_norm" when present).
    task.prepare(state) -> None                  # host-side, after init/restore: compile
        or load what logging needs (optional).
    task.log_images(state, step) -> dict[str, np.ndarray | PIL.Image]
        grids to write as samples/<name>_step_<N>.png ("" = samples/step_<N>.png).
    task.evaluate(state, step) -> dict[str, float]   # held-out metrics (optional, {} = none)
    task.restore_targets() -> dict               # optional: extra frozen params to load
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax
import numpy as np

Batch = Mapping[str, np.ndarray]


class Task(Protocol):
    name: str

    def init_state(self, key: jax.Array, example_batch: Batch) -> Any: ...

    def train_step(self, state: Any, batch: Batch, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]: ...

    def log_images(self, state: Any, step: int) -> dict[str, Any]: ...

    def evaluate(self, state: Any, step: int) -> dict[str, float]: ...


# config.model.target (the seed's class path, or its last part) -> "module:Class", imported lazily
TASKS: dict[str, str] = {
    "DiffusionEngine": "sgm_jax.training.diffusion_task:DiffusionTask",
    "AutoencodingEngine": "sgm_jax.autoencoding.task:AutoencoderTask",
    "AutoencoderKL": "sgm_jax.autoencoding.task:AutoencoderTask",
}


def task_class(target: str) -> type:
    import importlib

    from sgm_jax.errors import UserError

    name = str(target).rsplit(".", 1)[-1]
    if name not in TASKS:
        raise UserError(f"model.target {target!r} cannot be trained; trainable: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
