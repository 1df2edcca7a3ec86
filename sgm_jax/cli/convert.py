"""Convert a PyTorch checkpoint of the seed (sgm / Stable Diffusion) into an sgm_jax params
directory (Orbax), or back.

    sgm-convert (or python convert_torch_weights.py) --config configs/inference/sd_xl_base.py \
        --checkpoint sd_xl_base_1.0.safetensors --output checkpoints/sd_xl_base \
        [--dtype keep|float32|bfloat16|float16] [--allow-pickle] [--overwrite] [--use-ema]

    python convert_torch_weights.py --export --config configs/inference/sd_xl_base.py \
        --checkpoint checkpoints/sd_xl_base --output sd_xl_base.safetensors [--dtype ...] [--overwrite]

`.safetensors` files are read tensor by tensor (memory-mapped); pickled `.ckpt` / `.pt`
files only with --allow-pickle (they can run code when unpickled; torch is then needed).
The output is written atomically: on any error it is left as it was. Errors are one line
on stderr and exit code 2. Conversion runs on the host only (JAX on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sgm_jax.convert import checkpoint as ck
from sgm_jax.convert.checkpoint import CheckpointFileError, CheckpointMismatchError
from sgm_jax.errors import UserError, one_line

from .configs import ArgumentParser, load_config

EXIT_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sgm-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config file or shipped name, e.g. inference/sd_xl_base")
    p.add_argument("--checkpoint", required=True,
                   help="input: .safetensors (or .ckpt/.pt with --allow-pickle); with --export the params directory")
    p.add_argument("--output", required=True, help="output params directory; with --export a .safetensors file")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="dtype of the written weights (keep: as stored)")
    p.add_argument("--allow-pickle", action="store_true", help="allow unpickling .ckpt/.pt files (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--use-ema", action="store_true", help="convert the UNet's EMA weights (model_ema.*)")
    p.add_argument("--export", action="store_true", help="params directory -> seed-layout .safetensors")
    return p.parse_args(argv)


def _quiet_logs() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every save/restore step
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def run(args: argparse.Namespace) -> str:
    config = load_config(args.config)
    start = time.perf_counter()
    if args.export:
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        meta = ck.read_metadata(args.checkpoint)
        sd = ck.export_checkpoint(ck.load_params(args.checkpoint), config, dtype=args.dtype)
        ck.save_safetensors(sd, out, {"format": "pt", "converted_by": "sgm_jax", "config": args.config,
                                      "source": str(meta.get("source", ""))}, overwrite=args.overwrite)
        n = sum(v.size for v in sd.values())
        return f"exported {len(sd)} tensors ({n:,} parameters) to {out} in {time.perf_counter() - start:.1f} s"
    out = ck.convert_file(args.checkpoint, config, args.output, dtype=args.dtype, allow_pickle=args.allow_pickle,
                          overwrite=args.overwrite, use_ema=args.use_ema, metadata={"config": args.config})
    meta = ck.read_metadata(out)
    return (f"converted {meta['num_tensors']} tensors ({meta['num_params']:,} parameters, {', '.join(meta['dtypes'])}) "
            f"to {out} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Conversion is host work (eval_shape + numpy); keep JAX off accelerators so it neither
    # preallocates GPU memory nor prints device warnings.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _quiet_logs()

    try:
        print(run(args))
    except (CheckpointFileError, CheckpointMismatchError, UserError, FileExistsError, FileNotFoundError,
            NotImplementedError, ValueError, KeyError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_ERROR)  # an interrupted conversion: 130 / 143
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
