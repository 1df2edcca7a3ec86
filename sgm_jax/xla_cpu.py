"""XLA:CPU defaults that make the UNet's training step several times faster on CPU.

XLA:CPU (jaxlib 0.8+) hands every convolution to YNNPACK by default; YNNPACK's kernels for
the weight-gradient convolutions of a training step are very slow (they dominate the step:
see benchmarks/RESULTS.md). `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`
routes single convolutions back to XLA's Eigen path; forward numerics are unchanged within
float32 rounding (the fixture parity tests run with it).

`import sgm_jax` appends the flag to XLA_FLAGS, before any backend exists, when the
installed jaxlib knows it (an unknown flag aborts XLA) and the user has not set it.
`SGM_JAX_XLA_CPU_DEFAULTS=0` turns this off. Only the CPU backend reads these flags.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
from pathlib import Path

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def flag_name(flag: str) -> str:
    """The name XLA knows a flag by: "--xla_a=b" -> "xla_a"."""
    return flag.split("=")[0].lstrip("-")


def _jaxlib_knows(name: str) -> bool:
    """True when a jaxlib shared library contains the flag's name (so XLA will accept it)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = name.encode()
    for root in spec.submodule_search_locations:
        for lib in sorted(Path(root).glob("*.so"), key=lambda p: -p.stat().st_size)[:3]:
            try:
                with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(needle) >= 0:
                        return True
            except (OSError, ValueError):
                continue
    return False


# Several CPU processes (gloo): a collective waits this long for its peers; XLA's 30 s fail a job
# whose hosts compile at different speeds (one misses the compilation cache). A dead peer is
# noticed by its closed connections and the peer watch (multihost.PeerWatch), not by this.
MULTI_PROCESS_FLAGS = ("--xla_cpu_collective_timeout_seconds=3600",)


def apply_cpu_defaults(environ: dict | None = None, flags: tuple[str, ...] = CPU_FLAGS) -> list[str]:
    """Appends `flags` to XLA_FLAGS where supported; returns the flags it added."""
    env = os.environ if environ is None else environ
    if env.get("SGM_JAX_XLA_CPU_DEFAULTS", "1") == "0":
        return []
    current = env.get("XLA_FLAGS", "")
    added = []
    for flag in flags:
        if flag_name(flag) not in current and _jaxlib_knows(flag_name(flag)):
            added.append(flag)
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def skip_absent_tpu(environ: dict | None = None) -> bool:
    """With libtpu installed (the [tpu] extra, for sgm-compile's compile-only devices) on a machine
    without TPU chips, JAX's first backend start would try the TPU runtime: about 2 s and three of
    libtpu's error lines on stderr, then CPU anyway. Choose CPU there, as jax itself counts chips
    (its cloud_tpu_init), unless the user chose platforms, forces a TPU start, or another PJRT
    plugin (a GPU) is installed. Returns whether it chose CPU."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in env or importlib.util.find_spec("libtpu") is None:
        return False
    from importlib.metadata import entry_points

    if entry_points(group="jax_plugins") or importlib.util.find_spec("jax_plugins") is not None:
        return False
    from jax._src import hardware_utils  # private, but the very count jax's own TPU start uses

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return False
    env["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")  # jax may have read the environment already
    return True
