"""How a training run is stopped and watched from outside: signals (preemption, Ctrl-C) and the
profiler window. Used by loop.py."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import jax


class StopFlag:
    """SIGTERM (preemption) or Ctrl-C -> finish the current step, save, exit cleanly.
    A second Ctrl-C interrupts at once (the last checkpoint is kept)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handler, runs to the end
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @classmethod
    def code(cls, name: str | None) -> int:
        """A signal's name as a number the hosts can agree on (0: none)."""
        return 0 if name is None else 1 + [s.name for s in cls.SIGNALS].index(name)

    @classmethod
    def name(cls, code: int) -> str:
        return cls.SIGNALS[code - 1].name


class Profiler:
    """`training.profile_steps = (first, last)`: a jax.profiler trace of those steps in <workdir>/profile
    (open it with TensorBoard's profile plugin or Perfetto)."""

    def __init__(self, window: Any, directory: Path):
        self.first, self.last = (int(window[0]), int(window[1])) if window else (-1, -1)
        self.directory, self.active = directory, False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, out: Any) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
            self.active = False
