"""Orbax checkpoints of a training run: periodic, keep-N, atomic, resumable, sharded.

`<workdir>/checkpoints/<step>/` holds two Orbax items: `state` (the task's state pytree:
step, params, optimiser state, EMA) and `data` (JSON: the data iterators' states, one per
host), so a resumed run sees exactly the batches an uninterrupted one would. Checkpoints
written before the data item existed hold one item, `default`, and still restore.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save never replaces the last good checkpoint; the temp folders such a save leaves
behind are removed by Orbax (`cleanup_tmp_directories`) when the next run opens the directory,
and those of a save that fails here at once (`remove_interrupted_saves`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgm_jax import multihost
from sgm_jax.errors import UserError, one_line

from .background import HeldBackgroundErrors

STATE, DATA, LEGACY = "state", "data", "default"
TMP_MARK = ".orbax-checkpoint-tmp"


def step_dirs(directory: Path) -> list[int]:
    """Finished checkpoint steps under `directory`, newest first."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def interrupted_saves(directory: Path) -> list[Path]:
    """The temp folders of saves that did not finish (killed mid-write, or failed)."""
    return [p for p in (directory.iterdir() if directory.is_dir() else ()) if TMP_MARK in p.name]


def remove_interrupted_saves(directory: Path) -> list[Path]:
    """Delete the temp folders of a save that failed in this run; returns what was removed."""
    removed = interrupted_saves(directory)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _item_names(step_dir: Path) -> tuple[str, ...]:
    return (LEGACY,) if (step_dir / LEGACY).is_dir() and not (step_dir / STATE).is_dir() else (STATE, DATA)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """ocp.CheckpointManager under `<workdir>/checkpoints`, with the run's failure rules:
    a save that fails is one UserError at that save (and its temp folder is removed); a
    checkpoint that does not restore is reported and moved aside, and the previous one is used.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = False):
        self.directory = Path(directory).absolute()
        # cleanup_tmp_directories: Orbax removes what an earlier run's killed save left (primary host)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self.async_save = async_save
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        self._pending: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
        """Save; with async saves a failure surfaces at the next save or close, still in one line."""
        self._check_pending()
        with HeldBackgroundErrors():  # a failed save's threads echo its error hundreds of times
            try:
                saved = self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})), force=force)
                if saved and not self.async_save:
                    self.manager.wait_until_finished()
            except Exception as e:  # disk full, permission, ...: one line, no half-written folder left
                if multihost.lost_peer(e):  # not the disk: another host is gone (the entry point says so)
                    raise
                self._failed(step, e)
        self._pending = step if saved and self.async_save else None
        return bool(saved)

    def _check_pending(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        with HeldBackgroundErrors():
            try:
                self.manager.wait_until_finished()
            except Exception as e:
                if multihost.lost_peer(e):
                    raise
                self._failed(step, e)

    def _failed(self, step: int, e: BaseException) -> None:
        try:  # let the failed save's other writes end first: they would recreate its temp folder
            self.manager.wait_until_finished()
        except Exception:
            pass
        # TensorStore writes of a failed synchronous save have no handle to wait on and can still
        # create files after the error: remove until no temp folder reappears for half a second
        remove_interrupted_saves(self.directory)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if not remove_interrupted_saves(self.directory):
                break
        raise UserError(f"saving checkpoint {step} in {self.directory} failed: {one_line(e)} "
                        "(disk full or not writable?); earlier checkpoints are intact", exit_code=3) from e

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """(state, data_state) of checkpoint `step`, into the structure / shardings of `abstract_state`."""
        names = _item_names(self.directory / str(step))
        target = ocp.args.StandardRestore(_abstract(abstract_state))
        if names == (LEGACY,):
            restored = self.manager.restore(step, args=ocp.args.Composite(default=target))
            return restored[LEGACY], None
        restored = self.manager.restore(step, args=ocp.args.Composite(state=target, data=ocp.args.JsonRestore()))
        return restored[STATE], restored[DATA]

    def restore_latest(self, abstract_state: Any, report=print) -> tuple[int | None, Any, Any]:
        """(step, state, data_state) of the newest checkpoint that restores; (None, None, None) when none does.

        A checkpoint that fails to restore is reported in one line and moved to
        `<workdir>/corrupt_checkpoints/<step>` (kept for inspection, out of keep-N's way).
        A structure mismatch (another model in this workdir) is a UserError, not corruption.
        """
        for step in step_dirs(self.directory):
            check_tree_matches(self.directory / str(step), abstract_state)
            error: Exception | None = None
            try:
                with HeldBackgroundErrors():  # a failed read's in-flight reads echo it hundreds of times
                    state, data_state = self.restore_step(step, abstract_state)
            except Exception as e:  # truncated / deleted files: fall back to the previous checkpoint
                error = e
            # all hosts restore the same step: one host's failure moves the checkpoint aside for all
            if not multihost.agree_max([error is not None])[0]:
                return step, state, data_state
            aside = self.quarantine(step)
            if multihost.is_main():
                why = one_line(error)[:200] if error is not None else "it failed on another host"
                report(f"warning: checkpoint {step} does not restore ({why}); moved to {aside}, "
                       "resuming from the previous one")
        return None, None, None

    def quarantine(self, step: int) -> Path:
        """Process 0 moves checkpoint `step` to corrupt_checkpoints/; every host then forgets it."""
        src = self.directory / str(step)
        dest = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        if multihost.is_main():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest))
        multihost.sync(f"sgm_jax:quarantine_{step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self._check_pending()

    def close(self) -> None:
        try:
            self._check_pending()
        finally:
            self.manager.close()


# ----------------------------------------------------------------------------- checks and params


def _read_metadata(item_dir: Path) -> Any:
    """The pytree metadata of one Orbax item (shapes / dtypes, no arrays read)."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns about a metadata file it does not need
    try:
        meta = ocp.StandardCheckpointer().metadata(item_dir)
    finally:
        absl_logging.set_verbosity(level)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def _metadata_shapes(step_dir: Path) -> dict[str, tuple] | None:
    """{keypath: shape} of the state item from Orbax's metadata, without reading arrays."""
    try:
        tree = _read_metadata(step_dir / _item_names(step_dir)[0])
        shapes = {_norm(jax.tree_util.keystr(p)): tuple(m.shape)
                  for p, m in jax.tree_util.tree_leaves_with_path(tree) if getattr(m, "shape", None) is not None}
        return shapes or None  # damaged metadata: the restore decides (corruption, not a mismatch)
    except Exception:  # unreadable metadata: the restore itself will report it
        return None


def _norm(key: str) -> str:
    # metadata trees are dicts where the live state is a dataclass: compare by names only
    return key.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").lstrip(".")


def _shapes(tree: Any) -> dict[str, tuple]:
    return {_norm(jax.tree_util.keystr(p)): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def first_mismatch(expected: dict[str, tuple], got: dict[str, tuple], prefixes: Iterable[str] = ("",)) -> str | None:
    """One line naming the first differing key (missing, unexpected or another shape), or None."""
    exp = {k: v for k, v in expected.items() if any(k.startswith(p) for p in prefixes)}
    have = {k: v for k, v in got.items() if any(k.startswith(p) for p in prefixes)}
    for k in sorted(exp):
        if k not in have:
            return f"{k} is missing from the checkpoint"
        if exp[k] != have[k]:
            return f"{k} has shape {have[k]} in the checkpoint but {exp[k]} in the config"
    extra = sorted(set(have) - set(exp))
    return f"{extra[0]} is in the checkpoint but not in the config" if extra else None


def check_tree_matches(step_dir: Path, abstract_state: Any, prefixes: Iterable[str] = ("",)) -> None:
    """UserError naming the first mismatched key when checkpoint and config disagree (before any compile)."""
    got = _metadata_shapes(step_dir)
    if got is None:
        return
    problem = first_mismatch(_shapes(abstract_state), got, prefixes)
    if problem:
        raise UserError(f"checkpoint {step_dir} was written by a different model than this config: {problem}")


def restore_params(checkpoint_dir: str | Path, step: int | None = None, use_ema: bool = True,
                   on_skip: Callable[[int, str], None] | None = None) -> tuple[int, Any]:
    """(step, params) of a training checkpoint: the EMA weights when present and asked for, else
    the raw ones; nothing else (no optimiser state) is read. Newest restorable step by default;
    on_skip(step, reason) hears of each newer one that did not restore (when an older one does)."""
    directory = Path(checkpoint_dir).absolute()
    steps = [step] if step is not None else step_dirs(directory)
    if not steps or not (directory / str(steps[0])).is_dir():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {directory}: train first")
    skipped: list[tuple[int, str]] = []
    for s in steps:
        step_dir = directory / str(s)
        item = step_dir / _item_names(step_dir)[0]
        try:
            with HeldBackgroundErrors():
                name, restored = _restore_params(item, use_ema)
        except Exception as e:
            skipped.append((s, one_line(e)[:200]))
            continue
        for bad, reason in skipped if on_skip is not None else ():
            on_skip(bad, reason)
        return s, restored[name]
    raise UserError(f"no checkpoint in {directory} restores ({'; '.join(f'{s}: {r[:160]}' for s, r in skipped)})")


def _restore_params(item: Path, use_ema: bool) -> tuple[str, Any]:
    """(which params, {which: params}) of one state item: the EMA ones when there and asked for."""
    tree = _read_metadata(item)
    name = "ema_params" if use_ema and tree.get("ema_params") is not None else "params"
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0])), {name: tree[name]})
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return name, restored


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None
