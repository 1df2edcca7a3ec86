"""sgm-compile / python -m sgm_jax.compile_check: compile a config for a TPU slice, without a TPU.

    sgm-compile --config sdxl_finetune --topology v5p:2x2x1
    sgm-compile --config inference/sd_xl_base --topology v5e:1x1 --job sample --steps 30 --num 4

Builds what train.py (--job train) or sample.py (--job sample) would jit, from shapes alone
(no weights, no data), on the topology's compile-only devices with the config's mesh, compiles
it with XLA:TPU (needs `pip install libtpu`) and prints per chip: parameter / optimiser /
activation bytes against the chip's HBM, FLOPs and bytes per step, and the roofline step time,
MFU and images/s. Exit 0 when it fits, 1 when it does not (the shortfall on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from sgm_jax.aot import compile_check, format_report
from sgm_jax.errors import run_cli

from .configs import (
    ArgumentParser,
    apply_overrides,
    config_name,
    load_config,
    packaged_config_names,
    split_overrides,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sgm-compile", description=__doc__.split("\n\n")[0],
                       epilog="configs shipped with sgm_jax: " + ", ".join(packaged_config_names()) +
                       "\noverrides: --config.FIELD.PATH=VALUE (any field of the config)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file or shipped config name")
    p.add_argument("--topology", required=True,
                   help="TPU slice, GENERATION:SHAPE: v5p:2x2x1 (4 chips), v5p:2x2x2 (8 chips, 2 hosts), v5e:2x4, v6e:1x1")
    p.add_argument("--job", choices=("train", "sample"),
                   help="the training step or the sampling call (default: train for a training config)")
    p.add_argument("--width", type=int, help="image width (sampling; training: instead of the data's)")
    p.add_argument("--height", type=int, help="image height (as --width)")
    p.add_argument("--steps", type=int, help="sampler steps (default inference.num_steps)")
    p.add_argument("--num", type=int, help="images per sampling call (default inference.batch_per_device x chips)")
    p.add_argument("--sampler", help="sampler (default inference.sampler)")
    p.add_argument("--dtype", help="sampling compute dtype (default inference.dtype)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="sampling weights as loaded (default float32, as converted)")
    p.add_argument("--args-only", action="store_true",
                   help="stop before compiling: parameter / optimiser / frozen / batch bytes per chip from the "
                        "shardings, in seconds (no activations, FLOPs or time)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    run_cli(lambda: run(args, overrides))


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    config = apply_overrides(load_config(args.config), overrides)

    report, chip = compile_check(config, args.topology, job=args.job, config_name=config_name(args.config),
                                 width=args.width, height=args.height, steps=args.steps, num=args.num,
                                 sampler=args.sampler, dtype=args.dtype, param_dtype=args.param_dtype,
                                 args_only=args.args_only)
    print(json.dumps(report.as_dict(chip)) if args.json else format_report(report, chip), flush=True)
    if not report.fits:
        print(f"error: {report.shortfall()}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    main()
