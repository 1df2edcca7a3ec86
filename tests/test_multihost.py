"""Several hosts for real: 2 processes x 2 CPU devices joined by jax.distributed on 127.0.0.1
(gloo collectives), through train.py's real command line, against 1 process x 4 devices.

The fixture runs the two reference jobs once; each test adds the fault it is about.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, REPO
from hosts import Job, Logs, error_lines, free_port, host_env, metrics, shared_folder, wait_for_step

STEPS = 8
TRAIN = ["train.py", "--config", "tests/configs/tiny_mnist_tar.py",
         # 2 data streams on 1 host or 2: the same global batches, so the same losses
         "--config.data.params.train.datapipeline.pipeline_config.num_streams=2",
         f"--config.training.max_steps={STEPS}", "--config.training.checkpoint_every=2",
         # a sample grid at the end: the sampler runs on the global mesh, the grid is gathered to process 0
         f"--config.training.sample_every={STEPS}", "--config.model.params.sampler_config.params.num_steps=3"]


def train_argv(shards: str, workdir: Path, *extra: str) -> list[str]:
    return [*TRAIN, f"--config.data.params.train.datapipeline.urls={shards}", "--workdir", str(workdir), *extra]


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    import jax

    from sgm_jax.checkpointing.checkpoint import restore_params

    step, params = restore_params(Path(workdir) / "checkpoints", use_ema=False)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)} | {
        "step": np.asarray(step)}


def write_mnist_shards(out: Path) -> str:
    """8 tar shards of 12 real MNIST digits (<key>.png + <key>.cls), as prepare_data.py writes them."""
    import io

    from sgm_jax.data import webdataset as W
    from sgm_jax.data.mnist import find_idx_files, read_idx

    files = find_idx_files(DATA / "mnist")
    if files is None:
        pytest.skip(f"MNIST is not present in {DATA / 'mnist'}")
    images, labels = read_idx(files[0])[:96], read_idx(files[1])[:96]

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    out.mkdir(parents=True, exist_ok=True)
    W.write_tar_shards(iter({"__key__": f"{i:06d}", "png": png(x), "cls": str(int(y))}
                            for i, (x, y) in enumerate(zip(images, labels))), str(out / "mnist-%06d.tar"), 12)
    return str(out / "mnist-{000000..000007}.tar")


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The same 8 steps on 2 hosts x 2 devices and on 1 host x 4 devices (once per session)."""
    with shared_folder(tmp_path_factory, "multihost_reference") as (root, fresh):
        shards = str(root / "shards" / "mnist-{000000..000007}.tar")
        if fresh:
            write_mnist_shards(root / "shards")
            t0 = time.time()
            with Job(train_argv(shards, root / "two"), n=2, devices=2, logs=root / "logs_two") as two:
                assert two.wait(300) == [0, 0], two.tail()
            t1 = time.time()
            with Job(train_argv(shards, root / "one"), n=1, devices=4, logs=root / "logs_one") as one:
                assert one.wait(300) == [0], one.tail()
            print(f"2 hosts: {t1 - t0:.1f} s, 1 host: {time.time() - t1:.1f} s")
    return root, Logs(root / "logs_two", 2), Logs(root / "logs_one", 1), shards


def test_two_hosts_train_the_same_steps_as_one(reference_runs):
    root, two, _, _ = reference_runs
    losses_two = [row["loss"] for row in metrics(root / "two")]
    losses_one = [row["loss"] for row in metrics(root / "one")]
    assert len(losses_two) == len(losses_one) == STEPS
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
    a, b = final_params(root / "two"), final_params(root / "one")
    assert a.keys() == b.keys() and int(a["step"]) == STEPS
    # 2 processes sum gradients in another order; where a gradient is ~0 (zero-initialised output
    # layers) Adam turns that rounding into steps of up to lr, so compare the weights as a whole
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a if k != "step"))
    norm = np.sqrt(sum(np.sum(b[k] ** 2) for k in b if k != "step"))
    assert diff / norm < 1e-4, diff / norm
    grids = [np.asarray(Image.open(root / run / "samples" / f"step_{STEPS:07d}.png"), int) for run in ("two", "one")]
    # (the weights differ by the rounding above: the grids by a few levels at most, on average far less)
    gap = np.abs(grids[0] - grids[1])
    assert grids[0].shape == grids[1].shape and grids[0].std() > 0 and gap.max() <= 16 and gap.mean() < 0.5, (
        gap.max(), gap.mean())
    # process 0 alone writes the run's files; each host holds its own lock
    assert json.loads(two.stdout(0).strip().splitlines()[-1])["step"] == STEPS
    assert error_lines(two.stdout(1)) == []  # gloo prints its peer counts on stdout
    assert sorted(p.name for p in (root / "two").glob("train.lock*")) == ["train.lock", "train.lock.host1"]
    # every checkpoint holds both hosts' data positions, each reading its own stream (shards 0, 2, ... / 1, 3, ...)
    data = json.loads((root / "two" / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert len(data["hosts"]) == 2 and all(h["step"] == STEPS for h in data["hosts"])
    single = json.loads((root / "one" / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert single["hosts"][0]["grain"] == [h["grain"] for h in data["hosts"]]  # 1 host reads both streams


def test_a_second_job_on_the_workdir_is_refused_on_every_host(reference_runs, tmp_path):
    from sgm_jax.training.workdir import WorkdirLock

    root, _, _, mnist_shards = reference_runs
    workdir = tmp_path / "busy"
    workdir.mkdir()
    with WorkdirLock(workdir):  # another training holds host 0's lock
        with Job(train_argv(mnist_shards, workdir), n=2, devices=2, logs=tmp_path / "logs") as job:
            assert job.wait(180) == [2, 2], job.tail()
    for i in (0, 1):
        lines = error_lines(job.stderr(i))
        assert len(lines) == 1 and "in use by another training" in lines[0], lines


def test_sigterm_on_one_host_stops_both_at_one_step_and_resume_is_exact(reference_runs, tmp_path):
    root, _, _, mnist_shards = reference_runs
    workdir = tmp_path / "stopped"
    argv = train_argv(mnist_shards, workdir)
    with Job(argv, n=2, devices=2, logs=tmp_path / "logs_stop") as job:
        wait_for_step(workdir, 2, job, timeout=240)
        job.signal(1, signal.SIGTERM)  # preemption reaches one host first
        assert job.wait(120) == [0, 0], job.tail()
    summary = json.loads(job.stdout(0).strip().splitlines()[-1])
    stopped_at = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= stopped_at < STEPS, summary
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()  # both hosts saved that step together
    with Job(argv, n=2, devices=2, logs=tmp_path / "logs_resume") as job:
        assert job.wait(240) == [0, 0], job.tail()
    assert f"resumed from {workdir / 'checkpoints'}/{stopped_at}" in job.stdout(0)
    resumed, full = final_params(workdir), final_params(root / "two")
    for k in full:  # bit for bit: the same data positions, keys and reductions
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    assert [r["step"] for r in metrics(workdir)] == list(range(1, STEPS + 1))


def test_a_killed_host_stops_the_other_in_one_line_and_a_rerun_resumes(reference_runs, tmp_path):
    root, _, _, mnist_shards = reference_runs
    workdir = tmp_path / "killed"
    argv = train_argv(mnist_shards, workdir, "--config.training.max_steps=1000")
    with Job(argv, n=2, devices=2, logs=tmp_path / "logs_kill", heartbeat=20) as job:
        wait_for_step(workdir, 5, job, timeout=240)  # row 5 comes after checkpoint 4 is complete
        job.signal(1, signal.SIGKILL)
        t0 = time.time()
        code = job.procs[0].wait(timeout=120)
        waited = time.time() - t0
    assert code == 4, job.tail()
    lines = error_lines(job.stderr(0))
    # a collective whose peer closed its connection (gloo), or the peer watch: the same one line
    assert lines[-1].startswith("error: lost contact with another host of this job (") and \
        lines[-1].endswith("start the same command on every host again to resume"), lines[-3:]
    assert not any("Traceback" in line for line in lines), lines
    print(f"survivor exited {waited:.1f} s after the kill")
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 4
    # and the newest checkpoint lost its array data: both hosts must skip it and agree on the one before
    for f in (workdir / "checkpoints" / str(saved) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    with Job(train_argv(mnist_shards, workdir, f"--config.training.max_steps={saved + 2}"), n=2, devices=2,
             logs=tmp_path / "logs_rerun") as job:
        assert job.wait(240) == [0, 0], job.tail()
    assert f"resumed from {workdir / 'checkpoints'}/{saved - 2}" in job.stdout(0)
    warnings = [line for line in job.stdout(0).splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"checkpoint {saved} does not restore" in warnings[0], job.tail()
    assert [p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()] == [str(saved)]
    assert json.loads(job.stdout(0).strip().splitlines()[-1])["step"] == saved + 2


def test_sample_py_on_two_hosts_writes_each_image_once_as_one_host_does(reference_runs, tmp_path):
    root, _, _, _ = reference_runs
    outputs = {}
    for hosts in (2, 1):
        out = tmp_path / f"samples_{hosts}"
        argv = ["sample.py", "--workdir", str(root / "two"), "--classes", "3,7", "--num", "3", "--steps", "2",
                "--seed", "5", "--batch-size", "2", "--out", str(out)]
        with Job(argv, n=hosts, devices=4 // hosts, logs=tmp_path / f"logs_{hosts}") as job:
            assert job.wait(300) == [0] * hosts, job.tail()
        outputs[hosts] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
        if hosts == 2:  # 3 compiled batches of 2: host 0 writes 2 batches, host 1 one; no image twice
            written = [[line for line in job.stdout(i).splitlines() if line.startswith("wrote ")] for i in (0, 1)]
            assert [len(w) for w in written] == [4, 2] and not set(written[0]) & set(written[1])
    assert sorted(outputs[2]) == sorted(outputs[1]) and len(outputs[1]) == 6
    for name, pixels in outputs[1].items():  # noise by image index: the same pixels (2 vs 4 per device: +-1)
        assert np.abs(outputs[2][name].astype(int) - pixels).max() <= 1, name
    grid = tmp_path / "grid.png"  # a grid gathers every host's share to process 0
    with Job(["sample.py", "--workdir", str(root / "two"), "--classes", "3,7", "--num", "3", "--steps", "2",
              "--seed", "5", "--batch-size", "2", "--out", str(grid)], n=2, devices=2, logs=tmp_path / "logs_grid") as job:
        assert job.wait(300) == [0, 0], job.tail()
    assert Image.open(grid).size[0] > 3 * 28


def test_a_join_that_cannot_happen_is_one_line_never_a_lone_run(tmp_path):
    port = free_port()  # nobody listens: process 0 was never started
    cases = {
        ("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
         "--initialization-timeout", "2"): f"could not join 2 processes at 127.0.0.1:{port} (this is 1): nothing answers",
        ("--num-processes", "2"): "several processes need all three settings: --coordinator-address",
        ("--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"): "needs a port: HOST:PORT",
        ("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "2"):
            "process id 2 is not in [0, 2)",
    }
    for flags, message in cases.items():
        proc = subprocess.run([sys.executable, "train.py", "--config", "tests/configs/tiny_mnist_tar.py",
                               "--workdir", str(tmp_path / "w"), *flags], cwd=REPO, env=host_env(1),
                              capture_output=True, text=True, timeout=120)
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (flags, proc.stderr[-800:])
    assert not (tmp_path / "w").exists()  # nothing was trained alone
    env = {**host_env(1), "JAX_NUM_PROCESSES": "two"}
    proc = subprocess.run([sys.executable, "train.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "JAX_NUM_PROCESSES='two' is not an integer" in proc.stderr


def test_hosts_that_finish_compiling_apart_start_the_first_run_together(tmp_path):
    """A host that compiled first waits for the others outside the first collective (gloo gives a
    new one 30 s: the 2-host SDXL test failed when one host's compile took that much longer)."""
    skew = 4.0
    with Job(["tests/compile_together_worker.py", str(tmp_path), str(skew)], n=2, devices=2,
             logs=tmp_path / "logs") as job:
        assert job.wait(180) == [0, 0], job.tail()
    first, late = (json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2))
    assert first["sum"] == late["sum"] == 30.0  # 1 + 4 + 9 + 16 over both hosts' devices
    assert late["began"] - first["began"] > skew - 1.0  # the late host really began later
    assert first["returned"] >= late["began"]  # and the first one waited for it
