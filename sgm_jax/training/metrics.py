"""Metrics to `<workdir>/metrics.jsonl` (valid JSON: non-finite values are written as null) and
TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

from .workdir import write_json_atomic


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def truncate_after(path: Path, step: int) -> int:
    """Drop rows logged after `step` (a resumed run replays them); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut by a kill: drop it
            dropped += 1
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_json_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


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
        values = {k: _finite_or_none(v) for k, v in scalars.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        for k, v in values.items():
            if v is not None:
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
