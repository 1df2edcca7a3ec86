"""What one compiled step costs per chip: memory against the chip's HBM, FLOPs and bytes, and the
roofline estimate of its time (the compiler's own `optimal_seconds` is not used: XLA:TPU reports
it negative for large modules).

All figures are per chip. XLA:TPU's memory analysis gives argument / output / alias / temp
bytes of the partitioned program (one chip's share); the argument groups (parameters,
optimiser state, frozen parts, batch) are summed from the shardings the step is compiled
with, shard by shard. Its cost analysis counts one iteration of a loop body (a sampler's
scan): callers add the remaining iterations from a separately compiled body (`extra`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.extend
import numpy as np

from .topology import Chip, GiB

try:  # the HLO cost analysis that jax's own Lowered.cost_analysis calls (no public name for it)
    from jax._src.lib import _jax as _xla
except ImportError:  # another jaxlib layout: the unpartitioned count is left out
    _xla = None


def _itemsize(dtype: Any) -> int:
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:  # typed PRNG keys: two uint32 words
        return 8


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = tuple(leaf.shape)
        shard = leaf.sharding.shard_shape(shape) if getattr(leaf, "sharding", None) is not None else shape
        total += int(np.prod(shard, dtype=np.int64)) * _itemsize(leaf.dtype)
    return total


def global_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * _itemsize(x.dtype) for x in jax.tree_util.tree_leaves(tree))


def largest_leaf(tree: Any) -> dict[str, Any]:
    """The largest array of a tree: its path, shape, sharding spec, bytes in all and per chip."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}
    path, leaf = max(leaves, key=lambda pl: int(np.prod(pl[1].shape, dtype=np.int64)) * _itemsize(pl[1].dtype))
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    return {"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
            "spec": str(spec) if spec is not None else "", "bytes": global_bytes(leaf),
            "bytes_per_chip": shard_bytes(leaf)}


def cost_of(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def unpartitioned_flops(lowered: Any, devices: int) -> float:
    """FLOPs per device of the step before XLA:TPU partitions it: the lowered program (global shapes) costed
    by XLA's HLO cost analysis on the host, split evenly over the `devices` (data / FSDP parallel steps do
    equal work on each). A check on the compiled program's count, which takes each loop body once: XLA:TPU
    turns a matmul over an FSDP-split weight into a loop of partial matmuls (a collective matmul) above a
    size, and the compiled count then misses most of its FLOPs. 0.0 where jaxlib does not offer it."""
    if _xla is None:
        return 0.0
    try:
        module = lowered.compiler_ir("hlo").as_hlo_module()
        return float(_xla.hlo_module_cost_analysis(jax.extend.backend.get_backend("cpu"), module)["flops"]) / devices
    except Exception:  # jaxlib without it for this module: the compiled count stands alone
        return 0.0


# the compiled count may fall below the unpartitioned one by this much before it is called an undercount
# (XLA's simplifications; measured: SDXL's 10-block 1280-wide transformer step on v6e-8, 10.32 vs 10.29 TFLOP)
UNDERCOUNT = 0.97


@dataclasses.dataclass
class Report:
    """One compile's figures, per chip unless named otherwise (see the module docstring)."""

    job: str
    config: str
    topology: str
    chip: str
    chips: int
    hosts: int
    mesh: dict[str, int]
    images_per_step: int
    groups: dict[str, int]          # argument bytes per chip by role: params, optimizer, frozen, batch, ...
    groups_global: dict[str, int]   # the same, whole arrays (all chips together)
    largest_param: dict[str, Any]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float
    bytes_accessed: float
    transcendentals: float
    compile_seconds: float
    compiled: bool = True           # False: the arguments alone exceed HBM, nothing was compiled
    compiler_error: str = ""        # XLA:TPU refused the program for lack of HBM (its message; the sizes below
    usable_bytes: int = 0           # from it: what it needed, arguments included, less them = temp_bytes)
    kernel_calls: int = 0           # Pallas kernel calls per step; their work is in flops / bytes_accessed
    kernel_flops: float = 0.0       # (aot.kernels: XLA's cost analysis does not see inside them)
    kernel_bytes: float = 0.0
    compiled_flops: float = 0.0     # XLA:TPU's count (kernels added) where it undercounted collective-matmul loops
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Peak HBM of the step: inputs, temporaries, outputs not written over donated inputs, code."""
        return self.argument_bytes + self.temp_bytes + max(self.output_bytes - self.alias_bytes, 0) + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.total_bytes <= self.hbm_bytes

    def roofline(self, chip: Chip) -> dict[str, Any]:
        compute_s, memory_s = self.flops / chip.bf16_flops, self.bytes_accessed / chip.hbm_bandwidth
        step_s = max(compute_s, memory_s)
        return {"compute_seconds": compute_s, "memory_seconds": memory_s, "step_seconds": step_s,
                "bound": "compute" if compute_s >= memory_s else "memory",
                "mfu": compute_s / step_s if step_s > 0 else 0.0,
                "images_per_second": self.images_per_step / step_s if step_s > 0 else math.inf,
                "arithmetic_intensity": self.flops / self.bytes_accessed if self.bytes_accessed else math.inf,
                "peak_flops": chip.bf16_flops, "hbm_bandwidth": chip.hbm_bandwidth}

    def as_dict(self, chip: Chip) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits, shortfall_bytes=self.shortfall_bytes,
                   **self.roofline(chip))
        return out

    @property
    def shortfall_bytes(self) -> int:
        """How far the step is over the HBM it may use (XLA:TPU's usable figure when it refused the program)."""
        return max(self.total_bytes - (self.usable_bytes or self.hbm_bytes), 0)

    def shortfall(self) -> str:
        need, have = self.total_bytes / GiB, self.hbm_bytes / GiB
        if self.compiler_error:
            return (f"{self.config} ({self.job}) does not fit {self.topology}: XLA:TPU needs {need:.2f} GiB per chip, "
                    f"{self.usable_bytes / GiB:.2f} of the {self.chip}'s {have:.2f} GiB are usable "
                    f"({self.shortfall_bytes / GiB:.2f} GiB short: args {self.argument_bytes / GiB:.2f} "
                    f"+ temp {self.temp_bytes / GiB:.2f} GiB, XLA:TPU's figure)")
        return (f"{self.config} ({self.job}) does not fit {self.topology}: {need:.2f} GiB per chip needed, "
                f"{self.chip} has {have:.2f} GiB ({need - have:.2f} GiB short: args {self.argument_bytes / GiB:.2f} "
                f"+ temp {self.temp_bytes / GiB:.2f} GiB)")


def _gib(n: float) -> str:
    return f"{n / GiB:8.3f} GiB"


def format_report(r: Report, chip: Chip) -> str:
    """The human-readable report (stdout)."""
    roof = r.roofline(chip)
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh.items())
    lines = [f"{r.config} ({r.job}) on {r.topology}: {r.chips} {r.chip} chips, {r.hosts} host(s), mesh {mesh}; "
             + (f"compiled in {r.compile_seconds:.1f} s" if r.compiled else
                f"XLA:TPU ran out of HBM after {r.compile_seconds:.1f} s" if r.compiler_error else "not compiled"),
             "memory per chip:"]
    for name, n in r.groups.items():
        lines.append(f"  {name:<22}{_gib(n)}   (all chips: {r.groups_global[name] / GiB:.3f} GiB)")
    if r.compiler_error:
        lines += [f"  {'arguments (shardings)':<22}{_gib(r.argument_bytes)}",
                  f"  {'activations (temp)':<22}{_gib(r.temp_bytes)}   (XLA:TPU's out-of-memory error)",
                  f"  {'total':<22}{_gib(r.total_bytes)} of {r.usable_bytes / GiB:.2f} GiB usable: DOES NOT FIT "
                  f"({r.shortfall_bytes / GiB:.2f} GiB short; FLOPs and time unknown)"]
        return "\n".join(lines + [f"note: {n}" for n in r.notes])
    if not r.compiled:
        verdict = ("the arguments fit, activations unknown" if r.fits else
                   f"DOES NOT FIT ({(r.total_bytes - r.hbm_bytes) / GiB:.2f} GiB short before any activation)")
        lines.append(f"  {'arguments':<22}{_gib(r.argument_bytes)} of {r.hbm_bytes / GiB:.0f} GiB HBM (from the "
                     f"shardings; not compiled): {verdict}")
        return "\n".join(lines + [f"note: {n}" for n in r.notes])
    lines += [f"  {'arguments (compiler)':<22}{_gib(r.argument_bytes)}",
              f"  {'activations (temp)':<22}{_gib(r.temp_bytes)}",
              f"  {'outputs not donated':<22}{_gib(max(r.output_bytes - r.alias_bytes, 0))}",
              f"  {'code':<22}{_gib(r.code_bytes)}",
              f"  {'total':<22}{_gib(r.total_bytes)} of {r.hbm_bytes / GiB:.0f} GiB HBM: "
              + ("fits" if r.fits else f"DOES NOT FIT ({(r.total_bytes - r.hbm_bytes) / GiB:.2f} GiB short)")]
    lp = r.largest_param
    if lp:
        lines.append(f"  largest parameter {lp['path']} {lp['shape']} {lp['dtype']} sharded {lp['spec'] or 'P()'}: "
                     f"{lp['bytes'] / 2**20:.1f} MiB, {lp['bytes_per_chip'] / 2**20:.1f} MiB per chip")
    lines += ["per step, per chip:",
              f"  {r.flops / 1e12:.3f} TFLOP, {r.bytes_accessed / 1e9:.3f} GB accessed "
              f"(intensity {roof['arithmetic_intensity']:.0f} FLOP/byte)",
              f"roofline ({chip.name}: {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e12:.2f} TB/s HBM):",
              f"  compute {roof['compute_seconds'] * 1e3:.2f} ms, memory {roof['memory_seconds'] * 1e3:.2f} ms -> "
              f"{roof['step_seconds'] * 1e3:.2f} ms per step, {roof['bound']}-bound",
              f"  MFU at most {roof['mfu'] * 100:.1f}%, {roof['images_per_second']:.2f} images/s "
              f"({r.images_per_step} images per step)"]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


class _NotCompiled:
    """Stands in for a compiled step whose arguments alone exceed HBM (no compile was run), or one
    XLA:TPU refused for lack of HBM (`error`: its message; `temp_bytes`: the temporaries it needed)."""

    def __init__(self, argument_bytes: int, temp_bytes: int = 0, error: str = "", usable_bytes: int = 0):
        self.argument_size_in_bytes, self.output_size_in_bytes = argument_bytes, 0
        self.alias_size_in_bytes = self.generated_code_size_in_bytes = 0
        self.temp_size_in_bytes, self.error, self.usable_bytes = temp_bytes, error, usable_bytes

    def memory_analysis(self) -> "_NotCompiled":
        return self

    def cost_analysis(self) -> dict:
        return {}


def arguments_bytes(groups: Mapping[str, Any]) -> int:
    return sum(shard_bytes(v) for v in groups.values())


def not_compiled(groups: Mapping[str, Any]) -> Any:
    return _NotCompiled(arguments_bytes(groups))


# XLA:TPU's compile-time out-of-memory error, e.g. "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out
# of memory on HBM, the total memory required for HLO temporaries (16.09G) exceeds available HBM (15.75G)."
# Read here as counting the arguments too: sdxl_lora on v5e-4 asks 15.78G with 13.19 GiB of float32
# arguments, and compiles with a bfloat16 base (6.63 GiB) and 2.78 GiB of temp; SDXL's 8-image sampling
# call asks 16.09G with 9.89 GiB of weights, and compiles in bfloat16 (4.89) with 3.27 of temp. Read as
# temporaries alone, float32 would add 13 GiB, more than a bfloat16 copy of every weight. The second
# figure is the chip's HBM less what the runtime keeps (v5e: 15.75 of 16 GiB).
# Larger programs fail later, in the memory-space assignment: "Ran out of memory in memory space hbm. Used
# 31.28G of 31.24G hbm. Exceeded hbm capacity by 41.04M." (sdxl_finetune, 8 images per v6e chip): its "Used"
# is the whole program's.
_HBM_OOM = (re.compile(r"temporaries \((?P<need>[\d.]+)(?P<unit>[KMGT])\)"
                       r".*?available HBM \((?P<have>[\d.]+)(?P<unit2>[KMGT])\)", re.S),
            re.compile(r"memory space hbm\. Used (?P<need>[\d.]+)(?P<unit>[KMGT]) of (?P<have>[\d.]+)(?P<unit2>[KMGT]) hbm"))
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(groups: Mapping[str, Any], error: BaseException) -> Any | None:
    """A stand-in compiled step for XLA:TPU's compile-time HBM out-of-memory `error`: the arguments from
    the shardings, the temp bytes as the message's need less them, its usable HBM; None for any other error."""
    text = str(error)
    found = next((m for m in (p.search(text) for p in _HBM_OOM) if m), None)
    if found is None and ("RESOURCE_EXHAUSTED" not in text or "hbm" not in text.lower()):
        return None
    args = arguments_bytes(groups)
    need = int(float(found["need"]) * _UNITS[found["unit"]]) if found else 0
    usable = int(float(found["have"]) * _UNITS[found["unit2"]]) if found else 0
    said = re.search(r"RESOURCE_EXHAUSTED[^\n]*|Ran out of memory in memory space hbm[^\n\\']*", text)
    return _NotCompiled(args, max(need - args, 0), (said[0] if said else text.splitlines()[0]).strip(), usable)


def build_report(compiled: Any, *, job: str, config: str, topology: str, chip: Chip, devices: list[Any],
                 mesh: Any, images_per_step: int, groups: Mapping[str, Any], compile_seconds: float,
                 params_group: str = "parameters", extra: tuple[Any, float, Mapping[str, float]] | None = None,
                 kernels: Mapping[str, float] | None = None, notes: list[str] | None = None,
                 program_flops: float = 0.0) -> Report:
    """groups: role -> abstract argument tree (with shardings). compiled: the compiled step (or
    not_compiled(groups)). kernels: aot.kernels.kernel_cost of the traced step, added to XLA's figures.
    extra: (compiled loop body, how many more times it runs than the cost analysis counted, its kernels'
    cost): both costs grow by that many bodies. program_flops: `unpartitioned_flops` of the step; where
    the compiled count falls short of it on a mesh with an fsdp axis, it replaces that count (the
    collective-matmul loops XLA:TPU made there are the reason)."""
    mem = compiled.memory_analysis()
    cost = cost_of(compiled)
    notes, compiled_flops = list(notes or []), 0.0
    # only a mesh that splits weights makes such loops; on one chip the two counts differ by XLA:TPU's own
    # rewrites (measured: SDXL sampling on v6e-1, 102.67 compiled vs 106.08 TFLOP), and the compiled one stands
    splits_weights = int(mesh.shape.get("fsdp", 1)) > 1
    if cost["flops"] and splits_weights and program_flops * UNDERCOUNT > cost["flops"]:
        compiled_flops = cost["flops"]
        notes.append(f"XLA:TPU's cost analysis of the compiled program counts {cost['flops'] / 1e12:.3f} TFLOP per chip "
                     f"against the unpartitioned program's {program_flops / 1e12:.3f}: it takes each loop body once, "
                     "and XLA:TPU made loops of matmuls over FSDP-split weights (collective matmuls; "
                     "--config.mesh.collective_matmul=false turns them off). FLOPs here are the unpartitioned "
                     "count; the bytes accessed are a lower bound")
        cost["flops"] = program_flops
    kernels = dict(kernels or {"calls": 0.0, "flops": 0.0, "bytes_accessed": 0.0})
    if extra is not None:
        body, times, body_kernels = extra
        for total, more in ((cost, cost_of(body)), (kernels, body_kernels)):
            total.update({k: v + times * more[k] for k, v in total.items()})
    calls = int(kernels.get("calls", 0))
    if calls:
        cost["flops"] += kernels["flops"]
        cost["bytes_accessed"] += kernels["bytes_accessed"]
        compiled_flops += kernels["flops"] if compiled_flops else 0.0
        notes += [
            f"{calls} Pallas kernel calls per step (splash attention): their {kernels['flops'] / 1e12:.3f} TFLOP and "
            f"{kernels['bytes_accessed'] / 1e9:.3f} GB (matmuls and block reads, from their shapes) are added to "
            f"XLA's cost analysis, which does not see inside them"]
    return Report(job=job, config=config, topology=topology, chip=chip.name, chips=len(devices),
                  hosts=len({d.process_index for d in devices}), mesh={k: int(v) for k, v in mesh.shape.items()},
                  images_per_step=int(images_per_step),
                  groups={k: shard_bytes(v) for k, v in groups.items()},
                  groups_global={k: global_bytes(v) for k, v in groups.items()},
                  largest_param=largest_leaf(groups.get(params_group)),
                  argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                  code_bytes=int(mem.generated_code_size_in_bytes), hbm_bytes=chip.hbm_bytes,
                  compile_seconds=float(compile_seconds), compiled=not isinstance(compiled, _NotCompiled),
                  compiler_error=getattr(compiled, "error", ""), usable_bytes=getattr(compiled, "usable_bytes", 0),
                  kernel_calls=calls, kernel_flops=float(kernels.get("flops", 0.0)),
                  kernel_bytes=float(kernels.get("bytes_accessed", 0.0)), compiled_flops=compiled_flops,
                  notes=notes, **cost)
