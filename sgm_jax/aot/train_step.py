"""The training step train.py would run, compiled for a TPU slice from shapes alone.

`sgm_jax.training.loop.build_run` builds it, as for train.py: the config's task, mesh
(`config.mesh.data` / `fsdp`), FSDP shardings of the state and the guarded, donated step;
here with a stand-in data set (stand_in.py), a shape-only tokenizer and the slice's
compile-only devices. The state, the frozen parts (VAE, frozen text towers, a LoRA's base)
and the batch are ShapeDtypeStructs: nothing is allocated, loaded or downloaded.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from sgm_jax import parallel
from sgm_jax.data import from_config
from sgm_jax.training.loop import build_run
from sgm_jax.training.progress import CARRY_SHAPE
from sgm_jax.training.tasks import task_class

from .stand_in import ShapeTokenizer, lpips_stand_in, stand_in_data

# TrainState / AutoencoderState fields -> the report's argument groups
FIELD_GROUPS = {"params": "parameters", "opt_state": "optimizer state", "ema_params": "EMA parameters",
                "disc_params": "discriminator", "disc_batch_stats": "discriminator", "disc_opt_state":
                "discriminator optimizer"}


def _with_sharding(tree: Any, sharding: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)


def state_groups(abstract_state: Any) -> dict[str, Any]:
    """The state's fields grouped by role (parameters, optimizer state, ...); `step` is left out."""
    groups: dict[str, list] = {}
    for f in dataclasses.fields(abstract_state):
        value = getattr(abstract_state, f.name)
        if f.name == "step" or value is None:
            continue
        groups.setdefault(FIELD_GROUPS.get(f.name, f.name), []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in groups.items()}


def make_task(config: Any, dataset: Any) -> Any:
    cls = task_class(config.model.target)
    takes = inspect.signature(cls.__init__).parameters
    if "tokenizer" in takes:
        return cls(config, dataset, tokenizer=ShapeTokenizer())
    if "lpips_params" in takes:
        return cls(config, dataset, lpips_params=lpips_stand_in())
    return cls(config, dataset)


def prepare_train_step(config: Any, devices: list[Any], image_hw: tuple[int, int] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(argument groups for the report, facts: mesh, batch size, image shape, and "trace": () -> the
    traced step, jax.stages.Traced)."""
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    config.data = stand_in_data(config, image_hw)
    dataset = from_config(config.data, split="train", process_index=0, process_count=1)
    run = build_run(config, dataset=dataset, task=make_task(config, dataset), devices=devices)
    mesh, repl = run.mesh, parallel.replicated(run.mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((run.batch_size,) + tuple(v.shape[1:]), v.dtype, sharding=batch_sharding)
             for k, v in run.example.items()}
    frozen = run.task.frozen_shapes(run.example)
    frozen = None if frozen is None else _with_sharding(frozen, parallel.param_shardings(frozen, mesh))
    key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0), 1))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
    nonfinite = jax.ShapeDtypeStruct(CARRY_SHAPE, jnp.int32, sharding=repl)
    state = run.abstract_with_sharding()
    groups = state_groups(state)
    if frozen is not None:
        groups["frozen parameters"] = frozen
    groups["batch"] = batch
    facts = {"mesh": mesh, "batch_size": run.batch_size, "image_shape": tuple(dataset.image_shape),
             "trace": lambda: run.step_fn.trace(state, batch, key, nonfinite, frozen)}
    return groups, facts
