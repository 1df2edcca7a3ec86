"""The echoes of a failed checkpoint write or read from Orbax's and TensorStore's background threads.

When one write of a save (or one read of a restore) fails, Orbax closes the asyncio loop that
awaited it, and each TensorStore operation still in flight then completes into that closed loop:
each prints `RuntimeError: Event loop is closed` through sys.unraisablehook (hundreds on a full
disk or a truncated checkpoint), Orbax's signalling threads log the same error again with its
traceback through absl, and the futures and coroutines left behind say, whenever Python collects
them (asyncio's log, warnings), that nobody retrieved or awaited them.
The main thread already holds the error and reports it in one line (SGM_JAX_TRACEBACK=1: its
traceback). So while a save or restore runs these channels are held: dropped when it fails,
printed as usual when it succeeds (nothing another thread reports meanwhile is lost).
The operations in flight can outlive any wait (a busy machine, interpreter finalization), so after
the first failure the echoes stay silenced for the process, by what they are, not by when they
come: `Event loop is closed` from a callback or thread, Orbax's own error records, asyncio's
"never retrieved" and "never awaited" leftovers. Anything else still reaches stderr.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import warnings
from typing import Any

# the loggers Orbax's threads (absl) and asyncio's "exception was never retrieved" write to
LOGGERS = ("absl", "asyncio")
QUIET_AFTER_S, DRAIN_LIMIT_S = 0.5, 10.0


class _Hold(logging.Filter):
    def __init__(self, held: list) -> None:
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(("log", record))
        return False


def _is_echo(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _Echoes(logging.Filter):
    """Orbax's signalling threads' ERROR records (absl) and asyncio's leftovers of a failed operation."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return "exception was never retrieved" not in record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        return not (_is_echo(exc) or (record.levelno >= logging.ERROR and "orbax" in record.pathname))


_quieted = False


def _quiet_echoes_for_good() -> None:
    """After the first failed operation, for the rest of the process (idempotent)."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook

    def unraisable(u: Any) -> None:
        if not _is_echo(u.exc_value):
            unraisable_hook(u)

    def thread(args: Any) -> None:
        if not _is_echo(args.exc_value):
            thread_hook(args)

    sys.unraisablehook, threading.excepthook = unraisable, thread
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_ECHOES)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


_ECHOES = _Echoes()


class HeldBackgroundErrors:
    """`with HeldBackgroundErrors(): <an Orbax save or restore>`."""

    def __enter__(self) -> "HeldBackgroundErrors":
        self.held: list[tuple[str, Any]] = []
        self._hooks = (sys.unraisablehook, threading.excepthook)
        sys.unraisablehook = lambda unraisable: self.held.append(("unraisable", unraisable))
        threading.excepthook = lambda args: self.held.append(("thread", args))
        self._filter = _Hold(self.held)
        for name in LOGGERS:
            logging.getLogger(name).addFilter(self._filter)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._drain()
        sys.unraisablehook, threading.excepthook = self._hooks
        for name in LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
        if exc_type is None:
            self._replay()
            return
        _quiet_echoes_for_good()
        self.held.clear()  # what was held keeps the failed operation's futures alive: collect them now
        gc.collect()

    def _drain(self) -> None:
        """The operations in flight end soon after the failure: wait until none has spoken for a while."""
        deadline, seen, quiet_since = time.monotonic() + DRAIN_LIMIT_S, -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.held) != seen:
                seen, quiet_since = len(self.held), time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_AFTER_S:
                return
            time.sleep(0.05)

    def _replay(self) -> None:
        unraisable_hook, thread_hook = self._hooks
        for kind, item in self.held:
            if kind == "unraisable":
                unraisable_hook(item)
            elif kind == "thread":
                thread_hook(item)
            else:
                logging.getLogger(item.name).handle(item)
