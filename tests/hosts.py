"""Several real processes on this machine, joined as the hosts of one job (test helper).

Each process is an entry point's real command line with the README's flags
(`--coordinator-address 127.0.0.1:PORT --num-processes N --process-id I`), `devices` simulated
CPU devices of its own and gloo collectives: what N nodes of a cluster see. A persistent
compilation cache shared by all runs of a test session keeps repeated compiles cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SGM_JAX_TEST_CACHE", REPO / ".pytest_cache" / "jax_cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_", "PMI_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COMPILATION_CACHE_DIR=str(CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """(folder, whether this caller must fill it): one folder for all pytest-xdist workers of this
    session, filled by the first that asks while the others wait (a module fixture of real
    processes then runs once, on whichever worker gets there first)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(str(root) + ".lock"):
        done = root / ".done"
        root.mkdir(parents=True, exist_ok=True)
        yield root, not done.exists()
        done.touch()


class Logs:
    """What the processes of a job printed: logs/out<i>.txt, logs/err<i>.txt."""

    def __init__(self, logs: Path, n: int):
        self.logs, self.n = Path(logs), n

    def stderr(self, index: int) -> str:
        return (self.logs / f"err{index}.txt").read_text()

    def stdout(self, index: int) -> str:
        return (self.logs / f"out{index}.txt").read_text()

    def tail(self) -> str:
        return "\n".join(f"--- process {i}:\n{self.stderr(i)[-1500:]}" for i in range(self.n))


_JOBS_LOCK = None


def _jobs_lock():
    """One lock for every pytest-xdist worker of this machine (reentrant within a worker)."""
    global _JOBS_LOCK
    if _JOBS_LOCK is None:
        import tempfile

        from filelock import FileLock

        _JOBS_LOCK = FileLock(str(Path(tempfile.gettempdir()) / "sgm_jax_multiprocess_jobs.lock"))
    return _JOBS_LOCK


class Job(Logs):
    """`n` processes of one command line (`argv` after the python executable), started at once.

    Jobs of several processes run one at a time on the machine: two of them side by side on CI's
    2 cores put the hosts of one job tens of seconds apart, and gloo gives up connecting a new
    collective after 30 s (a fixed timeout, not ours to set), which such tests are not about."""

    def __init__(self, argv: Sequence[str], n: int, devices: int, logs: Path, heartbeat: int = 20):
        super().__init__(logs, n)
        self._locked = n > 1
        if self._locked:
            _jobs_lock().acquire(timeout=1800)
        self.port = free_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        flags = [] if n == 1 else ["--coordinator-address", f"127.0.0.1:{self.port}", "--num-processes", str(n),
                                   "--heartbeat-timeout", str(heartbeat)]
        for i in range(n):
            ids = [] if n == 1 else ["--process-id", str(i)]
            with open(self.logs / f"out{i}.txt", "w") as out, open(self.logs / f"err{i}.txt", "w") as err:
                self.procs.append(subprocess.Popen([sys.executable, *map(str, argv), *flags, *ids], cwd=REPO,
                                                   env=host_env(devices), stdout=out, stderr=err))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job still running after {timeout} s:\n{self.tail()}") from None

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self._locked:
            self._locked = False
            _jobs_lock().release()

    def signal(self, index: int, sig: int = signal.SIGTERM) -> None:
        self.procs[index].send_signal(sig)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


_GLOO_PEERS = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d*")


def error_lines(text: str) -> list[str]:
    """The lines a user reads: jax's distributed-runtime chatter (gloo's peer counts) left out."""
    # two gloo threads' messages can interleave, one's count then landing alone on the next line:
    # remove the messages wherever they sit, and the bare counts they leave
    text = _GLOO_PEERS.sub("", text)
    return [line for line in text.splitlines() if line.strip() and not line.strip().isdigit()]


def metrics(workdir: Path) -> list[dict]:
    rows = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line process 0 is writing right now
            pass
    return rows


def wait_for_step(workdir: Path, step: int, job: Job, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(workdir) / "metrics.jsonl"
        if path.is_file() and any(row["step"] >= step for row in metrics(workdir)):
            return
        if any(p.poll() is not None for p in job.procs):
            raise AssertionError(f"a process ended before step {step}:\n{job.tail()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s:\n{job.tail()}")
