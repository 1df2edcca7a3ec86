"""Data parallel and FSDP train steps on 8 simulated CPU devices equal the 1-device step;
a checkpoint saved on an 8-device mesh restores on a 2-device mesh and continues."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, REPO

WORKER = REPO / "tests" / "multidevice_worker.py"


def run_worker(mode: str, out, devices: int) -> dict[str, np.ndarray]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    data = str(DATA / "mnist") if (DATA / "mnist").is_dir() else ""
    proc = subprocess.run([sys.executable, str(WORKER), mode, str(out), data], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kind, shape = mode.split(":")
    return dict(np.load(out / f"result_{kind}_{shape}.npz"))


def assert_same_training(a: dict, b: dict, rtol: float = 2e-4, atol: float = 5e-5) -> None:
    """Losses to float32 reduction-order noise; params to well under one AdamW step (lr 1e-3):
    Adam's g / sqrt(v) turns reduction-order noise in near-zero gradients into sign flips of
    at most lr per step, so a wrong gradient (e.g. one device's share lost) moves far more."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    keys = [k for k in a if k.startswith(("p", "e")) and k not in ("devices",)]
    assert keys and set(keys) == {k for k in b if k.startswith(("p", "e")) and k != "devices"}
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return run_worker("steps:1x1", tmp_path_factory.mktemp("one"), devices=1)


def test_data_parallel_equals_one_device(single_device, tmp_path):
    dp = run_worker("steps:8x1", tmp_path, devices=8)
    assert int(dp["devices"]) == 8
    assert_same_training(single_device, dp)


def test_fsdp_equals_one_device(single_device, tmp_path):
    fsdp = run_worker("steps:2x4", tmp_path, devices=8)
    assert int(fsdp["sharded_leaves"]) > 0  # some parameters really are split over the fsdp axis
    assert_same_training(single_device, fsdp)


def test_checkpoint_from_8_devices_restores_on_2_and_continues(single_device, tmp_path):
    saved = run_worker("save:8x1", tmp_path, devices=8)  # 3 steps, then a checkpoint at step 3
    resumed = run_worker("resume:2x1", tmp_path, devices=2)  # restores and takes step 4
    assert_same_training(single_device, saved)
    assert np.isfinite(resumed["losses"]).all() and resumed["losses"].shape == (1,)
    # step 4 starts from the restored params: they moved from step 3's by one small update
    moved = [np.abs(resumed[k] - saved[k]).max() for k in saved if k.startswith("p")]
    assert 0 < max(moved) < 0.1
