"""A failed save leaves nothing behind, even when its writes outlive the error (a busy machine)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sgm_jax.errors import UserError
from sgm_jax.training.checkpoint import Checkpointer


class _LateWritesManager:
    """A manager whose save fails while one of its writes is still running (as TensorStore's do
    under load): the write creates the temp folder 0.2 s after the error was raised."""

    def __init__(self, directory):
        self.directory, self.writer = directory, None

    def save(self, step, args, force=False):
        def late_write() -> None:
            time.sleep(0.2)
            chunk = self.directory / f"{step}.orbax-checkpoint-tmp" / "state" / "d"
            chunk.mkdir(parents=True, exist_ok=True)
            (chunk / "0").write_bytes(b"late")

        (self.directory / f"{step}.orbax-checkpoint-tmp").mkdir()
        self.writer = threading.Thread(target=late_write)
        self.writer.start()
        raise OSError("OUT_OF_RANGE: Error writing ... Failed writing")

    def wait_until_finished(self) -> None:  # the late write is not Orbax's to wait for
        pass


def test_a_failed_save_removes_the_temp_folder_its_late_writes_recreate(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.manager = fake = _LateWritesManager(checkpointer.directory)
    with pytest.raises(UserError, match="saving checkpoint 6 .* failed: .*Failed writing") as info:
        checkpointer.save(6, {"x": np.zeros(2)})
    fake.writer.join()
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == []
