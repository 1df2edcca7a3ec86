"""Interrupted conversions leave nothing behind: real conversions in a child process are
stopped by SIGTERM / SIGINT mid-write (one line, exit 143 / 130, partial output removed) or
killed outright (SIGKILL: the next run removes the temp dir), and --overwrite of an existing
file leaves no `.old-*` beside the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sgm_jax.cli import convert as cli
from sgm_jax.configs.inference import tiny_sdxl
from sgm_jax.convert import checkpoint as ck
from sgm_jax.convert.common import unflatten_params
from sgm_jax.convert.layout import engine_parts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(params, seed-layout .safetensors of tiny_sdxl with random weights)."""
    config = tiny_sdxl.get_config()
    rng = np.random.default_rng(0)
    params = unflatten_params({p.params_path + path: rng.standard_normal(shape).astype(np.float32)
                               for p in engine_parts(config) for path, shape in p.shapes.items()})
    path = ck.save_safetensors(ck.export_checkpoint(params, config), tmp_path_factory.mktemp("src") / "tiny.safetensors")
    return params, path


# A real conversion in a child process, in small shards so that it is still writing when
# the signal comes (tiny_sdxl: ~60 shards of 256 KiB).
CONVERT_CHILD = """
import sys
from sgm_jax.configs.inference import tiny_sdxl
from sgm_jax.convert.checkpoint import convert_file
from sgm_jax.errors import run_cli
run_cli(lambda: print(convert_file(sys.argv[1], tiny_sdxl.get_config(), sys.argv[2], overwrite=True,
                                   shard_bytes=1 << 18)))
"""


def start_conversion(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", CONVERT_CHILD, str(src), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_mid_write(proc: subprocess.Popen, out: Path, shards: int = 3, timeout: float = 180) -> Path:
    """The conversion's temp dir, once it holds `shards` written shards."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            if len(list((tmp / "params").glob("*"))) >= shards:
                return tmp
        assert proc.poll() is None, f"conversion ended before the signal: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the conversion never got going")


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_sigterm_and_sigint_remove_the_partial_output(tiny, tmp_path):
    """Both signals, to two conversions at once: each stops at the next shard with one line
    and exit 143 / 130, the previous output is untouched and nothing is left beside it."""
    src = tiny[1]
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name / "out"
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("previous conversion")
        runs[sig] = (out, start_conversion(src, out))
    for sig, (out, proc) in runs.items():
        tmp = wait_mid_write(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
        assert err == f"error: interrupted by {sig.name}; the partial output was removed\n", err
        assert not tmp.exists() and hidden(out.parent) == [] and os.listdir(out) == ["keep.txt"]


def test_killed_conversion_is_cleaned_by_the_next_run(tiny, tmp_path, monkeypatch, capsys):
    """SIGKILL leaves the temp dir; the next conversion of the same output removes it, and
    --overwrite of an existing file leaves no `.old-*` behind."""
    params, src = tiny
    out = tmp_path / "out"
    out.write_text("an old file in the way")
    proc = start_conversion(src, out)
    tmp = wait_mid_write(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert tmp.exists() and out.read_text() == "an old file in the way"
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # main() sets it; restored afterwards
    rc = cli.main(["--config", str(REPO / "configs/inference/tiny_sdxl.py"), "--checkpoint", str(src),
                   "--output", str(out), "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    assert os.listdir(tmp_path) == ["out"]
    loaded = ck.load_params(out)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
