"""The converted model on disk: an Orbax directory of the engine params tree.

    OUT/metadata.json      what was converted from what, counts, dtypes, shard list
    OUT/params/000/        Orbax PyTree checkpoints, each holding a disjoint part of the
    OUT/params/001/ ...    nested params tree ({"model": {"input_blocks_0": ...}}, numpy leaves)

Why shards: Orbax (tensorstore) copies every array it writes into its own buffers before
the commit, and restoring likewise goes through a second buffer, so saving or loading a
tree in one call needs twice its size in RAM (14 GB for SDXL in float16). Writing ~1 GiB
shards one after another, freeing each, keeps conversion near the size of one shard and
loading near the size of the tree. `load_params` merges the shards back into one tree.

Writes are atomic (sgm_jax.convert.atomic): everything goes to a hidden sibling temp dir
that is renamed into place only when complete, so a failed or interrupted save leaves OUT
exactly as it was and nothing beside it; temp dirs of killed runs go at the next save.

Loading restores each shard in groups of ~64 MB (Orbax partial restores), casting to the
requested dtype inside the restore: peak memory stays near the size of the result, not the
result plus a shard (or the whole tree) in the stored dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from sgm_jax.convert.atomic import ConversionStop, commit, remove_path, remove_stale_temps, sibling_temp
from sgm_jax.convert.common import FlaxPath, flatten_params, unflatten_params
from sgm_jax.convert.files import CheckpointFileError

PARAMS_SUBDIR = "params"
METADATA_FILE = "metadata.json"
FORMAT = "sgm_jax.params"
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
SAVE_CONCURRENT_GB = 1
RESTORE_CONCURRENT_GB = 2
RESTORE_GROUP_BYTES = 64 << 20

Leaves = Iterable[tuple[FlaxPath, Any]]


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    # No compression: trained float weights hardly compress, and zstd costs time and a
    # further buffer per array.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB,
                                          restore_concurrent_gb=RESTORE_CONCURRENT_GB, use_compression=False)
    return ocp.Checkpointer(handler)


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before a long conversion) when `out_dir` exists and may not be replaced,
    or when its parent directory is missing."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite / overwrite=True to replace it)")
    if not out.absolute().parent.is_dir():
        raise FileNotFoundError(f"parent directory of {out} does not exist")
    return out


def _shards(leaves: Leaves, limit: int) -> Iterator[list[tuple[FlaxPath, np.ndarray]]]:
    batch: list[tuple[FlaxPath, np.ndarray]] = []
    size = 0
    for path, value in leaves:
        array = np.asarray(value)
        if batch and size + array.nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append((path, array))
        size += array.nbytes
    if batch:
        yield batch


def save_params(params: Mapping[str, Any] | Leaves, out_dir: str | os.PathLike,
                metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                shard_bytes: int = SHARD_BYTES, stop: ConversionStop | None = None) -> Path:
    """Write a params tree as an Orbax directory, atomically.

    params: a nested dict of arrays, or an iterable of (Flax path, array) pairs, which is
    consumed lazily (a converter can stream, so the whole tree never sits in memory).
    metadata (JSON-serialisable) goes to metadata.json, with `format`, `format_version`,
    `num_params`, `num_tensors`, `dtypes` and `shards` added. Refuses to replace an
    existing `out_dir` unless `overwrite`; on any failure `out_dir` is left untouched and
    the temp dir removed. `stop` (from `atomic.stop_on_signals`) is checked between shards.
    """
    out = check_output(out_dir, overwrite).absolute()
    remove_stale_temps(out)
    leaves = flatten_params(params).items() if isinstance(params, Mapping) else params
    tmp = sibling_temp(out, "tmp")
    (tmp / PARAMS_SUBDIR).mkdir(parents=True)
    try:
        checkpointer, shards, count, n_params, dtypes = _checkpointer(), [], 0, 0, set()
        for shard in _shards(leaves, shard_bytes):
            if stop is not None:
                stop.check()
            name = f"{len(shards):03d}"
            checkpointer.save(tmp / PARAMS_SUBDIR / name, unflatten_params(dict(shard)))
            shards.append(name)
            count += len(shard)
            n_params += sum(int(a.size) for _, a in shard)
            dtypes.update(str(a.dtype) for _, a in shard)
            del shard  # drop this shard before the next one is read
        meta = dict(metadata or {})
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, num_params=n_params, num_tensors=count,
                    dtypes=sorted(dtypes), shards=shards)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if stop is not None:
            stop.check()
        commit(tmp, out, overwrite)
    except BaseException:
        remove_path(tmp)
        raise
    return out


def read_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata.json of a directory written by `save_params`."""
    path = Path(out_dir) / METADATA_FILE
    if not path.is_file():
        raise CheckpointFileError(f"{out_dir}: not an sgm_jax params directory (no {METADATA_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointFileError(f"{out_dir}: {METADATA_FILE} is not of format {FORMAT!r}")
    return meta


def load_params(out_dir: str | os.PathLike, *, dtype: Any = None) -> dict[str, Any]:
    """The params tree saved by `save_params`, e.g. `{"model": ..., "conditioner":
    {"embedders_0": ...}, "first_stage": ...}`, as numpy arrays in host memory (hand them
    to jit or `jax.device_put`). `dtype` ("float32", "bfloat16", "float16" or a numpy dtype)
    casts floating leaves while they are read; None keeps the stored dtype."""
    meta = read_metadata(out_dir)
    target = None if dtype is None else to_numpy_dtype(dtype)
    checkpointer = _checkpointer()
    flat: dict[FlaxPath, np.ndarray] = {}
    for name in meta["shards"]:
        shard_dir = (Path(out_dir) / PARAMS_SUBDIR / name).absolute()
        for group in _restore_groups(checkpointer, shard_dir):
            flat.update(_restore_group(checkpointer, shard_dir, group, target))
    return unflatten_params(flat)


def _restore_groups(checkpointer: Any, shard_dir: Path) -> Iterator[list[tuple[FlaxPath, np.dtype]]]:
    """The shard's leaves (path, stored dtype) in groups of ~RESTORE_GROUP_BYTES stored bytes."""
    tree = checkpointer.metadata(shard_dir)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    group: list[tuple[FlaxPath, np.dtype]] = []
    size = 0
    for path, leaf in flatten_params(tree).items():
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if group and size + nbytes > RESTORE_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append((path, np.dtype(leaf.dtype)))
        size += nbytes
    if group:
        yield group


def _restore_group(checkpointer: Any, shard_dir: Path, group: list[tuple[FlaxPath, np.dtype]],
                   target: np.dtype | None) -> dict[FlaxPath, np.ndarray]:
    import orbax.checkpoint as ocp

    def args(stored: np.dtype) -> Any:
        cast = target if target is not None and _is_float(stored) and stored != target else None
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=cast)

    item = unflatten_params({path: np.empty(0, stored) for path, stored in group})  # which leaves, not values
    restore_args = unflatten_params({path: args(stored) for path, stored in group})
    restored = checkpointer.restore(shard_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    out = flatten_params(restored)
    return {path: np.asarray(out[path]) for path, _ in group}


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """"float32" / "bfloat16" / "float16" / a numpy or jax dtype -> numpy dtype."""
    if isinstance(dtype, str):
        names = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
        return np.dtype(names[dtype])
    return np.dtype(dtype)
