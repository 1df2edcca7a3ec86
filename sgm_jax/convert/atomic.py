"""Atomic outputs that leave nothing behind: hidden sibling temp paths, stale-temp cleanup,
replace-with-rollback, and a graceful stop on SIGTERM / SIGINT.

An output OUT is written as `.OUT.tmp-<pid>-<random>` beside it (same file system, so the
final rename is atomic) and renamed into place when complete; an existing OUT being replaced
is first renamed to `.OUT.old-<pid>-<random>`, then deleted. A process killed outright
(SIGKILL, power loss) can leave such a sibling behind: the next write of the same OUT removes
every one whose process is gone (`remove_stale_temps`), never one of a live process.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from sgm_jax.errors import UserError
from sgm_jax.signals import StopFlag

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


class Interrupted(UserError):
    """A stop was requested by SIGTERM / SIGINT; partial output has been removed."""

    def __init__(self, signame: str):
        super().__init__(f"interrupted by {signame}; the partial output was removed",
                         exit_code=130 if signame == "SIGINT" else 143)


def sibling_temp(path: Path, tag: str) -> Path:
    """`.NAME.<tag>-<pid>-<hex>` beside `path`."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_path(path: Path) -> None:
    """Delete a file, link or directory tree (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings of `path` left by dead processes."""
    removed = []
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m.group("name") != path.name:
            continue
        pid = m.group("pid")
        if pid is not None and _alive(int(pid)):
            continue
        remove_path(entry)
        removed.append(entry)
    return removed


def commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `tmp` (file or directory) to `out`. An existing `out` (file or
    directory) is replaced only with `overwrite`, put back if the swap fails, and deleted
    afterwards, so nothing is left beside it."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite / overwrite=True to replace it)")
    old = sibling_temp(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    remove_path(old)


class ConversionStop(StopFlag):
    """A StopFlag whose `check()`, called by long writers at safe points (between shards), raises
    Interrupted once a stop was asked for; a second signal of either kind raises it at once."""

    def again(self, name: str) -> None:
        raise Interrupted(name)

    def check(self) -> None:
        if self.stop is not None:
            raise Interrupted(self.stop)


def stop_on_signals() -> ConversionStop:
    """`with stop_on_signals() as stop:` SIGTERM / SIGINT ask for a stop at the next
    `stop.check()` instead of killing the process mid-write."""
    return ConversionStop()
