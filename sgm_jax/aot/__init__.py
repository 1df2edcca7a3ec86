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

from typing import Any

from .report import Report, build_report, format_report
from .topology import CHIPS, Chip, chip_of, compile_only_devices, libtpu_available

NOTE_FLOPS = ("FLOPs and bytes are XLA:TPU's cost analysis of the compiled per-chip program (remat recomputation "
              "included, so the MFU is of hardware FLOPs); the time is a roofline, not a measurement")


def default_job(config: Any) -> str:
    """'train' for a training config (it has a `training` section), 'sample' for an inference one."""
    return "train" if "training" in config else "sample"


def compile_check(config: Any, topology: str, *, job: str | None = None, config_name: str = "config",
                  width: int | None = None, height: int | None = None, steps: int | None = None,
                  num: int | None = None, sampler: str | None = None, dtype: str | None = None,
                  param_dtype: str = "float32") -> tuple[Report, Chip]:
    """Compile `config`'s training step or sampling call for `topology` ('v5p:2x2x2'); its Report."""
    chip = chip_of(topology)
    devices = compile_only_devices(topology)
    job = job or default_job(config)
    notes = [NOTE_FLOPS]
    if job == "train":
        from .train_step import compile_train_step

        hw = (int(height), int(width)) if width or height else None
        if hw is not None and not (width and height):
            raise ValueError("--width and --height go together")
        compiled, groups, facts = compile_train_step(config, devices, hw)
        h, w = facts["image_shape"][:2]
        notes.append(f"data: stand-in batches of {facts['batch_size']} x {h}x{w} (global)")
        return build_report(compiled, job="train", config=config_name, topology=topology, chip=chip,
                            devices=devices, mesh=facts["mesh"], images_per_step=facts["batch_size"],
                            groups=groups, compile_seconds=facts["lower_seconds"] + facts["compile_seconds"],
                            notes=notes), chip
    if job != "sample":
        raise ValueError(f"--job {job!r}: train or sample")
    from .sample_step import compile_sampling

    compiled, groups, facts = compile_sampling(config, devices, width=width, height=height, steps=steps, num=num,
                                               sampler=sampler, dtype=dtype, param_dtype=param_dtype,
                                               name=config_name)
    spec, (w, h) = facts["spec"], facts["size"]
    notes.append(f"sampling: {facts['batch_size']} images of {w}x{h} per call, {spec.name} {spec.steps} steps "
                 f"{'with' if spec.guided else 'without'} CFG + VAE decode, on one host's {len(facts['devices'])} "
                 f"chip(s); the step is one whole call ({facts['evals']} guided denoiser evaluations, counted from "
                 f"a compile of one loop step, {facts['body_compile_seconds']:.1f} s)")
    extra = (facts["body"], facts["evals"] - facts["per_step"]) if facts["body"] is not None else None
    return build_report(compiled, job="sample", config=config_name, topology=topology, chip=chip,
                        devices=facts["devices"], mesh=facts["mesh"], images_per_step=facts["batch_size"],
                        groups=groups, compile_seconds=facts["compile_seconds"], extra=extra, notes=notes), chip


__all__ = ["CHIPS", "Chip", "Report", "build_report", "chip_of", "compile_check", "compile_only_devices",
           "default_job", "format_report", "libtpu_available"]
