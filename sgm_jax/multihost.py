"""What the hosts of one job must share: decisions, small host values, and arrays brought to host memory.

One program runs on every host (parallel.initialize_distributed joins them). A decision that
ends or saves a run is taken from every host's view at once, through a collective, so all
hosts act on it at the same step; with one process every function here is a local no-op.
A host that died makes these collectives fail (gloo / the coordination service), which the
callers turn into one error line.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np


def is_main() -> bool:
    """Process 0 writes the files (config, metrics, grids, images); the others compute alike."""
    return jax.process_index() == 0


def host_rows(values: Sequence[int]) -> np.ndarray:
    """Every host's int32 `values`: [process_count, len(values)], row p from host p."""
    local = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local[0])).reshape(jax.process_count(), -1)


def agree_max(values: Sequence[int]) -> list[int]:
    """Element-wise maximum over hosts: a flag any host raised is raised for all."""
    return [int(v) for v in host_rows(values).max(axis=0)]


def gather_json(value: Any) -> list[Any]:
    """Every host's JSON-able `value`, in process order (e.g. each host's data position)."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    length = int(host_rows([raw.size]).max())
    padded = np.zeros((length,), np.uint8)
    padded[: raw.size] = raw
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def sync(name: str) -> None:
    """Wait until every host got here (e.g. after process 0 changed the shared workdir)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """Arrays of a (possibly multi-host) computation as numpy on every host: a global array
    some of whose shards live on other hosts is gathered, a local or replicated one is read."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)
