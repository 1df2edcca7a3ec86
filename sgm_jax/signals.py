"""SIGTERM (preemption) and Ctrl-C as a request to stop at the next safe point, for every long job
(a training step's end, the next shard of a conversion) instead of dying mid-write."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """While active (a `with` block in the main thread), SIGTERM / SIGINT set `stop` to the
    signal's name; the job looks at it where stopping is safe. A second Ctrl-C interrupts at once
    (`again`); outside the main thread no handler is installed and the job runs to its end.
    Previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop is not None:
            self.again(name)
        self.stop = name

    def again(self, name: str) -> None:
        """A signal after the first: Ctrl-C interrupts now (a second SIGTERM waits for the stop)."""
        if name == "SIGINT":
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @classmethod
    def code(cls, name: str | None) -> int:
        """A signal's name as a number the hosts can agree on (0: none)."""
        return 0 if name is None else 1 + [s.name for s in cls.SIGNALS].index(name)

    @classmethod
    def name(cls, code: int) -> str:
        return cls.SIGNALS[code - 1].name
