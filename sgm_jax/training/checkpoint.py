"""Orbax checkpoints of the TrainState: periodic, keep-N, atomic, resumable, sharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager under `<workdir>/checkpoints/<step>`.

    Orbax writes each step to a temporary directory and renames it when complete, so an
    interrupted save never replaces the last good checkpoint.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3, save_interval_steps: int = 1):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               save_interval_steps=save_interval_steps)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        return bool(saved)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restore into the structure / shardings of `abstract_state` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
