"""Which Task trains a config: by `config.model.target`, the seed's class path or its last part."""

from __future__ import annotations

from sgm_jax.errors import UserError

from .autoencoder_task import AutoencoderTask
from .diffusion_task import DiffusionTask
from .task import Task

TASKS: dict[str, type[Task]] = {
    "DiffusionEngine": DiffusionTask,
    "AutoencodingEngine": AutoencoderTask,
    "AutoencoderKL": AutoencoderTask,
}


def task_class(target: str) -> type[Task]:
    name = str(target).rsplit(".", 1)[-1]
    if name not in TASKS:
        raise UserError(f"model.target {target!r} cannot be trained; trainable: {', '.join(sorted(TASKS))}")
    return TASKS[name]
