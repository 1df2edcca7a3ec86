"""Metrics to `<workdir>/metrics.jsonl` and TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping


class MetricsWriter:
    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # event files TensorBoard reads

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
