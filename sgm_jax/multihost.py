"""What the hosts of one job must share: decisions, small host values, and arrays brought to host memory.

One program runs on every host (parallel.initialize_distributed joins them). A decision that
ends or saves a run is taken from every host's view at once, through a collective, so all
hosts act on it at the same step; with one process every function here is a local no-op.
A host that died makes these collectives fail (gloo / the coordination service), which the
callers turn into one error line.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


# Words of the runtime errors a collective raises when a peer process is gone (gloo's broken
# connections, the coordination service's deadlines and missing heartbeats).
_LOST_PEER = ("gloo", "coordination", "heartbeat", "deadline_exceeded", "unavailable", "connection reset",
              "connection closed", "connection refused", "barrier")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another host of the job is gone."""
    text = str(e).lower()
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(w in text for w in _LOST_PEER)


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


# A barrier waits for the slowest host's compile of a large model on a pod; a host that died is
# found sooner by PeerWatch and jax's heartbeat.
BARRIER_TIMEOUT_S = 3600
_barrier_ids = itertools.count()


def sync(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every host got here (e.g. after process 0 changed the shared workdir).

    A barrier of the coordination service, not a device collective: gloo (CPU) gives a new
    collective a fixed 30 s for all hosts to arrive, less than hosts can drift apart."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    if distributed.global_state.client is None:  # joined without jax.distributed (no coordinator)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    # every host runs the same program, so the n-th barrier has the same id on all of them
    distributed.global_state.client.wait_at_barrier(f"{name}#{next(_barrier_ids)}", int(timeout_s * 1000))


def compile_together(fn: Any, *args: Any, name: str) -> Any:
    """`fn` (a jitted function) compiled for `args` on this host, returned once every host has
    compiled it, so that all hosts enter its first run together.

    Hosts compile at their own speed (a busy machine, a cache hit on one host only); without this
    the first to finish waits inside the first collective of the run, where gloo allows 30 s.
    The compiled executable is what later calls of `fn` with such arguments run (jax keeps it)."""
    return start_together(fn.lower(*args), name=name)


def start_together(lowered: Any, *, name: str) -> Any:
    """compile_together for a step the caller has lowered already (its cost analysis read too)."""
    compiled = lowered.compile()
    if _spans_hosts(compiled):  # a computation on this host's devices alone (sample.py's share) runs alone
        sync(f"sgm_jax:compiled:{name}")
    return compiled


def _spans_hosts(compiled: Any) -> bool:
    """Whether the executable's arguments live on devices of more than one process."""
    if jax.process_count() == 1:
        return False
    devices = set()
    for sharding in jax.tree_util.tree_leaves(compiled.input_shardings):
        devices |= set(sharding.device_set)
    return len({d.process_index for d in devices}) > 1


def to_host(tree: Any) -> Any:
    """Arrays of a (possibly multi-host) computation as numpy on every host: a global array
    some of whose shards live on other hosts is gathered, a local or replicated one is read."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


class PeerWatch:
    """A daemon thread that notices a host of the job is gone before jax's own heartbeat check
    does (which aborts with a long C++ trace), and calls `on_lost(one line)`.

    Every `interval` s each host bumps its counter in the coordination service's key-value
    store and reads the others'; a counter that has not moved for `timeout` s, or a store
    that no longer answers (process 0, which serves it, is gone), is a lost host. A host that
    ends well says "done" first, so its peers do not count it lost while they finish."""

    PREFIX = "sgm_jax/alive/"

    def __init__(self, timeout: float, on_lost: Callable[[str], None], interval: float = 2.0):
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout, self.interval, self.on_lost = float(timeout), float(interval), on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sgm_jax-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        if self.client is not None and self.count > 1:
            self._thread.start()
        return self

    def stop(self) -> None:
        """This host ends well: tell the peers, then stop watching."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        try:
            self.client.key_value_set(self.PREFIX + str(self.me), "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the store may already be shutting down)
            pass

    def _run(self) -> None:
        seen = {p: ("", time.monotonic()) for p in range(self.count) if p != self.me}
        beat = 0
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(self.PREFIX + str(self.me), str(beat), allow_overwrite=True)
                values = {p: self._value(p) for p in seen}
            except Exception as e:  # noqa: BLE001 (the store is gone with process 0)
                if not self._stop.is_set():
                    self.on_lost(f"the job's coordinator (process 0) does not answer: {' '.join(str(e).split())[:120]}")
                return
            now = time.monotonic()
            for p, value in values.items():
                if value == "done" or value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout:
                    self.on_lost(f"process {p} has not been heard from for {self.timeout:.0f} s")
                    return

    def _value(self, process: int) -> str:
        try:
            return self.client.key_value_try_get(self.PREFIX + str(process))
        except Exception as e:  # noqa: BLE001
            if "not_found" in str(e).lower().replace(" ", "_"):  # not started watching yet
                return ""
            raise


def host_share(n: int) -> range:
    """This host's contiguous share of n work items (images, prompts): hosts in order, the
    first n % P hosts one item more."""
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every host's `rows` [n_p, ...], concatenated in process order, on every host: features,
    scores or images of each host's share. A host with no share may pass any empty array."""
    rows = np.asarray(rows)
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    described = gather_json([rows.shape[0], list(rows.shape[1:]), rows.dtype.str])
    counts = [n for n, _, _ in described]
    _, trailing, dtype = next((d for d in described if d[0]), described[0])
    padded = np.zeros((max(max(counts), 1), *trailing), np.dtype(dtype))
    padded[: rows.shape[0]] = rows.reshape((rows.shape[0], *trailing))
    every = np.asarray(multihost_utils.process_allgather(padded))  # [P, max n, ...]
    return np.concatenate([every[p, :n] for p, n in enumerate(counts)])
