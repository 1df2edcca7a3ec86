"""Peak memory of converting a full-size SDXL-base checkpoint, against the file size.

Writes (once) a synthetic `.safetensors` with every key and shape of the released
sd_xl_base_1.0.safetensors (float16 like the real file, plus its two non-parameter
entries), streamed tensor by tensor so writing needs no RAM. Values are random N(0, 0.02):
like real weights they do not compress, which matters since Orbax compresses (zstd).
Then runs, each in a fresh subprocess, and reports its peak RSS (getrusage ru_maxrss):
  baseline   import + abstract layout only (the fixed cost of JAX / Flax / eval_shape)
  convert    convert_torch_weights.py --dtype keep  (safetensors -> Orbax directory)
  convert32  the same with --dtype float32 (output twice the file size)
  load       load_params(directory), what the sampler does first

    python benchmarks/convert_memory.py [--dir /tmp/sgm_jax_convert_bench]
        [--modes baseline,convert,convert32,load] [--keep-files]

Needs ~22 GB free disk (6.9 GB file, 6.9 GB float16 and 13.9 GB float32 outputs, the
latter two deleted at the end unless --keep-files) and ~16 GB RAM for convert32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "inference" / "sd_xl_base.py"
EXTRAS = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": ((1, 77), np.int64),
          "conditioner.embedders.1.model.logit_scale": ((), np.float16)}
_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def synthetic_layout() -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    from sgm_jax.configs.inference import sd_xl_base
    from sgm_jax.convert.checkpoint import checkpoint_shapes

    shapes = {k: (s, np.dtype(np.float16)) for k, s in checkpoint_shapes(sd_xl_base.get_config()).items()}
    shapes.update({k: (s, np.dtype(d)) for k, (s, d) in EXTRAS.items()})
    return shapes


def write_safetensors_streaming(layout: dict[str, tuple[tuple[int, ...], np.dtype]], path: Path) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data)
    written one tensor at a time: memory stays at one tensor."""
    header, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        size = int(np.prod(shape)) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "note": "synthetic sgm_jax benchmark weights"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        rng = np.random.default_rng(0)
        for key, (shape, dtype) in layout.items():
            n = int(np.prod(shape))
            values = np.arange(n) if dtype.kind == "i" else rng.standard_normal(n, dtype=np.float32) * 0.02
            f.write(values.astype(dtype).tobytes())
    os.replace(tmp, path)


def child(mode: str, file: Path, out: Path) -> None:
    """Runs in the measured subprocess; prints one JSON line."""
    start = time.perf_counter()
    if mode == "baseline":
        from sgm_jax.configs.inference import sd_xl_base
        from sgm_jax.convert.layout import engine_parts

        engine_parts(sd_xl_base.get_config())
    elif mode in ("convert", "convert32"):
        import convert_torch_weights as cli

        dtype = "float32" if mode == "convert32" else "keep"
        rc = cli.main(["--config", str(CONFIG), "--checkpoint", str(file), "--output", str(out),
                       "--dtype", dtype, "--overwrite"])
        if rc:
            raise SystemExit(rc)
    elif mode == "load":
        import jax

        from sgm_jax.convert.checkpoint import load_params

        params = load_params(out)
        print(f"# loaded {sum(x.size for x in jax.tree.leaves(params)):,} values", file=sys.stderr)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"mode": mode, "peak_rss": peak_kib * 1024, "seconds": time.perf_counter() - start}))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/sgm_jax_convert_bench")
    ap.add_argument("--modes", default="baseline,convert,convert32,load")
    ap.add_argument("--keep-files", action="store_true", help="leave the synthetic file and outputs in --dir")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "FILE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        os.environ["JAX_PLATFORMS"] = "cpu"
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]))
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    file = work / "sdxl_base_f16.safetensors"
    layout = synthetic_layout()
    need = sum(int(np.prod(s)) * d.itemsize for s, d in layout.values())
    free = shutil.disk_usage(work).free
    if not file.exists():
        if free < 4.2 * need:  # the file, one float16 and one float32 conversion
            raise SystemExit(f"need ~{gib(4.2 * need)} free in {work}, have {gib(free)}")
        t = time.perf_counter()
        write_safetensors_streaming(layout, file)
        print(f"# wrote {file} ({gib(file.stat().st_size)}) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for mode in args.modes.split(","):
        out = work / ("out_f32" if mode == "convert32" else "out_keep")
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(file), str(out)], cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["output"] = dir_size(out) if mode.startswith("convert") else 0
        rows.append(r)
    size = file.stat().st_size
    print(f"\ninput: {file.name}, {gib(size)} ({len(layout)} tensors, float16)\n")
    print(f"| {'run':<10} | {'peak RSS':>10} | {'RSS / file':>10} | {'output':>10} | {'time':>7} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    for r in rows:
        out = gib(r["output"]) if r["output"] else "-"
        print(f"| {r['mode']:<10} | {gib(r['peak_rss']):>10} | {r['peak_rss'] / size:>10.2f} | {out:>10} | "
              f"{r['seconds']:>5.0f} s |")
    if not args.keep_files:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
