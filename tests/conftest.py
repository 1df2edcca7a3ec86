"""Shared test helpers: where the workplace's shared data and fixtures live."""

from __future__ import annotations

import importlib.util
import os
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

    cache = Path(os.environ.get("SGM_JAX_TEST_CACHE", REPO / ".pytest_cache" / "jax_cache"))
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
