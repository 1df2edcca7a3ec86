"""How a training run is watched from outside: the profiler window. Used by loop.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


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
