"""Compile checks for TPU slices without TPU hardware (`python -m sgm_jax.compile_check`).

    report, chip = compile_check(config, "v5p:2x2x2", job="train")
    print(format_report(report, chip)); report.fits

Builds exactly what train.py (training.loop.build_run) or sample.py (inference's
SamplingRunner) would jit, from shapes alone, on the topology's compile-only devices
(topology.py, needs libtpu), compiles it with XLA:TPU and reports per chip: parameter /
optimiser / activation bytes against HBM, FLOPs and bytes per step, and the roofline time,
MFU and images/s they imply (report.py). libtpu is imported only here, never on the plain path.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .kernels import kernel_cost
from .report import (Report, arguments_bytes, build_report, format_report, not_compiled, out_of_memory,
                     unpartitioned_flops)
from .sample_step import prepare_sampling
from .topology import CHIPS, Chip, GiB, chip_of, compile_only_devices, libtpu_available
from .train_step import prepare_train_step

NOTE_FLOPS = ("FLOPs and bytes are XLA:TPU's cost analysis of the compiled per-chip program (remat recomputation "
              "included, so the MFU is of hardware FLOPs); the time is a roofline, not a measurement")


def default_job(config: Any) -> str:
    """'train' for a training config (it has a `training` section), 'sample' for an inference one."""
    return "train" if "training" in config else "sample"


def _compile(trace: Any, groups: dict[str, Any], chip: Chip, notes: list[str],
             devices: int, args_only: bool = False) -> tuple[Any, float, float, dict[str, float], float]:
    """(compiled, tracing + lowering seconds, compile seconds, the Pallas kernels' cost from the traced
    jaxpr, the unpartitioned program's FLOPs per device: report.unpartitioned_flops); when the arguments alone exceed the chip's HBM nothing is lowered or compiled (minutes
    saved: no activation size can make it fit), nor with args_only (the shardings' bytes in seconds,
    for a first look at a large slice). XLA:TPU's out-of-memory error gives a stand-in with the temp
    bytes it names (the report says DOES NOT FIT) instead of a traceback."""
    need = arguments_bytes(groups)
    if need > chip.hbm_bytes or args_only:
        why = "--args-only" if need <= chip.hbm_bytes else "the arguments alone exceed HBM"
        notes.append(f"not compiled ({why}): the arguments need {need / GiB:.2f} GiB per chip "
                     f"(temp, FLOPs and time unknown)")
        return not_compiled(groups), 0.0, 0.0, kernel_cost(None), 0.0
    t0 = time.perf_counter()
    traced = trace()
    kernels = kernel_cost(traced.jaxpr.jaxpr)
    lowered = traced.lower()
    program_flops = unpartitioned_flops(lowered, devices)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # jax.errors.JaxRuntimeError; XLA:TPU's out-of-memory is a report, not a crash
        compiled = out_of_memory(groups, err)
        if compiled is None:
            raise
        notes.append(f"XLA:TPU refused the program: {compiled.error}")
        kernels, program_flops = kernel_cost(None), 0.0
    return compiled, t1 - t0, time.perf_counter() - t1, kernels, program_flops


def compile_check(config: Any, topology: str, *, job: str | None = None, config_name: str = "config",
                  width: int | None = None, height: int | None = None, steps: int | None = None,
                  num: int | None = None, sampler: str | None = None, dtype: str | None = None,
                  param_dtype: str = "float32", args_only: bool = False) -> tuple[Report, Chip]:
    """Compile `config`'s training step or sampling call for `topology` ('v5p:2x2x2'); its Report.
    args_only: stop before lowering, with the arguments' bytes per chip from the shardings."""
    chip = chip_of(topology)
    devices = compile_only_devices(topology)
    job = job or default_job(config)
    notes = [NOTE_FLOPS]
    shape = topology.split(":", 1)[1].lower().split("x")
    chips = math.prod(int(n) for n in shape) if all(n.isdigit() for n in shape) else len(devices)
    if chips != len(devices):  # v4: libtpu may list each TensorCore of a chip as a device
        notes.append(f"libtpu lists {len(devices)} devices for {chips} chips: figures are per device, the HBM "
                     f"per device is taken as the chip's")
    if job == "train":
        if bool(width) != bool(height):
            raise ValueError("--width and --height go together")
        groups, facts = prepare_train_step(config, devices, (int(height), int(width)) if width else None)
        compiled, lower_s, seconds, kernels, program_flops = _compile(facts["trace"], groups, chip, notes,
                                                                      len(devices), args_only)
        h, w = facts["image_shape"][:2]
        notes.append(f"data: stand-in batches of {facts['batch_size']} x {h}x{w} (global)" + (
            f"; traced and lowered in {lower_s:.1f} s, compiled in {seconds:.1f} s" if seconds else ""))
        return build_report(compiled, job="train", config=config_name, topology=topology, chip=chip,
                            devices=devices, mesh=facts["mesh"], images_per_step=facts["batch_size"],
                            groups=groups, compile_seconds=lower_s + seconds, kernels=kernels, notes=notes,
                            program_flops=program_flops), chip
    if job != "sample":
        raise ValueError(f"--job {job!r}: train or sample")

    groups, facts = prepare_sampling(config, devices, width=width, height=height, steps=steps, num=num,
                                   sampler=sampler, dtype=dtype, param_dtype=param_dtype, name=config_name)
    compiled, lower_s, seconds, kernels, program_flops = _compile(facts["trace"], groups, chip, notes,
                                                                  len(facts["devices"]), args_only)
    extra, body_seconds = None, 0.0
    if facts["body"] is not None and seconds and not getattr(compiled, "error", ""):
        t0 = time.perf_counter()
        body = facts["body"]()
        extra = (body.lower().compile(), facts["evals"] - facts["per_step"], kernel_cost(body.jaxpr.jaxpr))
        body_seconds = time.perf_counter() - t0
    spec, (w, h) = facts["spec"], facts["size"]
    notes.append(f"sampling: {facts['batch_size']} images of {w}x{h} per call, {spec.name} {spec.steps} steps "
                 f"{'with' if spec.guided else 'without'} CFG + VAE decode, on one host's {len(facts['devices'])} "
                 f"chip(s); the step is one whole call ({facts['evals']} denoiser calls: the loop's remaining steps "
                 f"are counted from a compile of one step, {body_seconds:.1f} s); lowered in "
                 f"{lower_s:.1f} s, compiled in {seconds:.1f} s")
    return build_report(compiled, job="sample", config=config_name, topology=topology, chip=chip,
                        devices=facts["devices"], mesh=facts["mesh"], images_per_step=facts["batch_size"],
                        groups=groups, compile_seconds=lower_s + seconds + body_seconds,
                        extra=extra, kernels=kernels, notes=notes, program_flops=program_flops), chip


__all__ = ["CHIPS", "Chip", "Report", "build_report", "chip_of", "compile_check", "compile_only_devices",
           "default_job", "format_report", "libtpu_available"]
