"""Shared test helpers: where the workplace's shared data and fixtures live."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import signal
import time
from pathlib import Path

import pytest

# With libtpu installed (CI installs it for tests/test_compile_check.py), a plain JAX start on a
# CPU machine would first try to open a TPU (seconds, and error lines on the stderr that CLI tests
# read): the suite runs on CPU, and libtpu's one-process lock would stop `pytest -n 2`. Set before
# JAX is imported; subprocesses inherit it. The compile check itself picks its platform alone.
if importlib.util.find_spec("libtpu") is not None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = Path(__file__).resolve().parents[1]
JAX_CACHE = Path(os.environ.get("SGM_JAX_TEST_CACHE", REPO / ".pytest_cache" / "jax_cache"))
SHARED = Path(os.environ.get("SGM_JAX_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"


def fixture_path(*parts: str) -> Path:
    """Path under ../shared/fixtures, skipping the test with the reason when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present (it ships beside the repo as ../shared/fixtures)")
    return path


def pytest_configure(config):
    """A persistent XLA cache shared by the test processes: repeated shapes compile once."""
    import jax

    JAX_CACHE.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def capped_file_size(limit_bytes: int):
    """Files this process writes stop at `limit_bytes` (a write past it fails with EFBIG, SIGXFSZ
    ignored), as on a full disk. XLA's cache entries written meanwhile are cut short too: they are
    removed afterwards, so later tests do not read truncated executables."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    start = time.time() - 1.0
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
        for entry in JAX_CACHE.glob("*"):
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime >= start:
                    entry.unlink()
