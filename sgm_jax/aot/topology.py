"""TPU slices without TPUs: the compile-only devices of a topology, and each chip's published peaks.

`compile_only_devices("v5p:2x2x2")` returns the 8 devices (2 hosts) of that slice as
`jax.experimental.topologies` describes them through libtpu (an optional dependency:
`pip install libtpu`); jitted functions lowered on a mesh of them compile with XLA:TPU
itself, so memory and cost analyses are the real compiler's, on a CPU-only machine.

The host side stays on the CPU backend (`jax_platforms=cpu`, set before any backend
exists): with libtpu installed, JAX would otherwise first try to open a TPU runtime on
every machine (seconds of retries and error lines on a CPU box). Only this path sets it,
so a user who never asks for a TPU compile never loads libtpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import tempfile
from typing import Any, Iterator

from sgm_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM capacity (bytes), dense bf16 peak (FLOP/s), HBM bandwidth (bytes/s)."""

    name: str
    hbm_bytes: int
    bf16_flops: float
    hbm_bandwidth: float


# Published per-chip figures, Google Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): bf16 peak TFLOP/s, HBM GiB, HBM GB/s.
#   v4  275 TFLOP/s, 32 GiB, 1,200 GB/s      v5e 197 TFLOP/s, 16 GiB,   819 GB/s
#   v5p 459 TFLOP/s, 95 GiB, 2,765 GB/s      v6e 918 TFLOP/s, 32 GiB, 1,640 GB/s
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.819e12),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


def chip_of(topology: str) -> Chip:
    """'v5p:2x2x2' -> CHIPS['v5p']; UserError for a generation without published peaks here."""
    gen = topology.split(":", 1)[0].strip().lower()
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS or ":" not in topology:
        raise UserError(f"--topology {topology!r}: expected GENERATION:SHAPE with GENERATION one of "
                        f"{', '.join(CHIPS)} (e.g. v5p:2x2x2, v5e:2x4, v6e:1x1)")
    return CHIPS[gen]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def use_cpu_host() -> None:
    """Keep the host computations (shape evaluation, keys) on XLA:CPU; a no-op once a backend exists."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """libtpu writes start-up warnings (no TPU hostnames, no accelerator type) straight to fd 2;
    they mean nothing for compile-only devices. Captured, and shown only if the call fails."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def compile_only_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice (all hosts), e.g. 'v5p:2x2x2' -> 8 devices on 2 hosts."""
    chip_of(topology)
    if not libtpu_available():
        raise UserError("compiling for TPU needs libtpu, which is not installed: pip install libtpu "
                        "(or pip install -e '.[tpu]')")
    # a second process loading libtpu would fail on its lock file; compile-only use shares nothing
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    use_cpu_host()
    from jax.experimental import topologies

    error: BaseException | None = None
    with _captured_stderr() as noise:
        try:
            desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
            devices = list(desc.devices)
        except Exception as err:  # libtpu's errors are long: the first line says what it did not like
            devices, error = [], err
    if not devices:
        print(noise[0][-2000:], file=sys.stderr, end="")
        text = str(error or "no devices").strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise UserError(f"libtpu does not know topology {topology!r}: {first}")
    return devices


def hosts_of(devices: list[Any]) -> int:
    return len({d.process_index for d in devices})
