"""A failed save leaves nothing behind, even when its writes outlive the error (a busy machine); a
failed save or restore is one line on stderr, not the echoes of Orbax's background threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import DATA, REPO
from sgm_jax.errors import UserError
from sgm_jax.checkpointing.checkpoint import Checkpointer, step_dirs


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


def _capped_files(kib: int, cmd: list[str]) -> list[str]:
    """`cmd` with files capped at `kib` KiB: a write past the cap fails with EFBIG (SIGXFSZ ignored,
    inherited through exec), as on a full disk; set in the child's shell, not by forking this one."""
    return ["bash", "-c", f'trap "" XFSZ; ulimit -f {kib}; exec "$@"', "bash", *cmd]


@pytest.mark.parametrize("traceback", [False, True])
def test_a_full_disk_during_a_save_is_one_line_on_stderr(tmp_path, traceback):
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--workdir", str(workdir),
           "--config.model.params.network_config.params.num_res_blocks=1",
           "--config.model.params.network_config.params.channel_mult=(1,)",
           "--config.data.params.batch_size=8", "--config.training.sample_every=0",
           "--config.training.max_steps=2", "--config.training.checkpoint_every=2"]
    if (DATA / "mnist").is_dir():
        cmd.append(f"--config.data.params.path={DATA / 'mnist'}")
    env = dict(os.environ, SGM_JAX_TEST_CACHE=str(REPO / ".pytest_cache" / "jax_cache"),
               SGM_JAX_TRACEBACK="1" if traceback else "0")
    proc = subprocess.run(_capped_files(64, cmd), cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("train: ")]  # not the bar
    assert "Event loop is closed" not in proc.stderr and "ERROR:absl" not in proc.stderr, proc.stderr[-3000:]
    assert not step_dirs(workdir / "checkpoints") and not list((workdir / "checkpoints").iterdir())
    if not traceback:
        assert proc.returncode == 3 and len(lines) == 1, lines[:20]
        assert lines[0].startswith("error: saving checkpoint 2 in ") and "(disk full or not writable?)" in lines[0]
    else:  # the failed write's traceback and ours, once
        assert proc.stderr.count("Traceback (most recent call last)") == 2, proc.stderr[-3000:]
        assert "UserError: saving checkpoint 2 in " in proc.stderr and len(lines) < 200, len(lines)


def test_resuming_past_truncated_checkpoints_is_the_warning_lines_alone(tmp_path):
    # many arrays: the reads still in flight when the first fails each echo it (tens to hundreds of
    # tracebacks, timing-dependent; five truncated checkpoints make at least one flood near certain before)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from sgm_jax.checkpointing.checkpoint import Checkpointer
        tree = {{f"a{{i}}": np.full((64, 64), i, np.float32) for i in range(50)}}
        ckpt = Checkpointer({str(tmp_path / "ckpt")!r}, max_to_keep=10)
        step, state, _ = ckpt.restore_latest(jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree))
        print("restored", step, float(state["a7"][0, 0]))
        ckpt.close()
    """)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=10)
    tree = {f"a{i}": np.full((64, 64), i, np.float32) for i in range(50)}
    for step in range(1, 7):
        ckpt.save(step, tree, force=True)
    ckpt.close()
    for f in (tmp_path / "ckpt").glob("[2-6]/state/**/d/*"):
        f.write_bytes(f.read_bytes()[:10])
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [], proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert [line.split(" (")[0] for line in out[:-1]] == [f"warning: checkpoint {s} does not restore"
                                                         for s in (6, 5, 4, 3, 2)], out
    assert out[-1] == "restored 1 7.0", out
