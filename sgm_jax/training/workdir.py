"""A training workdir's guards: one trainer at a time (a lock file), and the run record
(`run.json`) that a resumed run must agree with."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable

from sgm_jax.errors import UserError

LOCK_NAME = "train.lock"


class WorkdirLock:
    """An exclusive flock on `<workdir>/train.lock`, released when the process ends (even by kill -9).

    On several hosts each takes its own (`train.lock` on host 0, `train.lock.host<p>` on host
    p): the hosts of one job never lock each other out, and a second job on the same workdir
    finds host 0's lock taken. `acquire()` reports instead of raising, so the hosts can agree."""

    def __init__(self, workdir: Path, host: int = 0):
        self.path = Path(workdir) / (LOCK_NAME if host == 0 else f"{LOCK_NAME}.host{host}")
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """None when taken, else the error line (who holds it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"{self.path.parent} is in use by another training (pid {holder}, {self.path.name}); "
                    "wait for it to finish or choose another --workdir")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd
        return None

    def __enter__(self) -> "WorkdirLock":
        problem = self.acquire() if self._fd is None else None
        if problem:
            raise UserError(problem)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` (a string as is, else as indented JSON) to `path` via a temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value if isinstance(value, str) else json.dumps(value, indent=2))
    tmp.replace(path)


def check_run_record(workdir: Path, data_description: str, stamps: dict[str, list[int]] | None = None,
                     allow_changed_shards: bool = False, report: Callable[[str], None] = print) -> None:
    """A resumed run must read the data the run was started on: run.json's "data" (the source),
    and "shards" ({path: [size, mtime_ns]}, DataSource.file_stamps): a shard replaced under its
    name is refused, or with `allow_changed_shards` reported once (run.json then records it anew)."""
    record = workdir / "run.json"
    if not record.is_file():
        return
    run = json.loads(record.read_text())
    recorded = run.get("data", "")
    if recorded and data_description and recorded != data_description:
        raise UserError(f"{workdir} was trained on '{recorded}' but this run would read '{data_description}'; "
                        "point the data config at the original data or use a new --workdir")
    before = run.get("shards") or {}
    changed = [p for p, stamp in (stamps or {}).items() if p in before and list(before[p]) != list(stamp)]
    if not changed:
        return
    names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    what = f"{len(changed)} shard(s) changed (size or modification time) since {workdir} last trained on them: {names}"
    if not allow_changed_shards:
        raise UserError(f"{what}; the checkpoint's data position refers to the old ones: restore them, use a new "
                        "--workdir, or resume on the new ones with --config.data.allow_changed_shards=True")
    report(f"warning: {what}; resuming on the new ones (data.allow_changed_shards)")
