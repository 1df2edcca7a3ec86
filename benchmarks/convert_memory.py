"""Peak memory of converting a full-size SDXL-base (or SD 2.1) checkpoint, against the file size.

Writes (once) a synthetic `.safetensors` with every key and shape of the released
sd_xl_base_1.0.safetensors (float16 like the real file, plus its two non-parameter
entries), streamed tensor by tensor so writing needs no RAM. Values are random N(0, 0.02):
like real weights they do not compress, which matters since Orbax compresses (zstd).
Then runs, each in a fresh subprocess, and reports its peak RSS (getrusage ru_maxrss):
  baseline   import + abstract layout only (the fixed cost of JAX / Flax / eval_shape)
  convert    convert_torch_weights.py --dtype keep  (safetensors -> Orbax directory)
  convert32  the same with --dtype float32 (output twice the file size)
  load       load_params(directory), what the sampler does first
  load16     load_params(float32 directory, dtype="float16"): cast inside grouped restores
  load16_before  the same the way load_params did it before (restore a whole ~1 GiB shard
             in float32, then cast), kept here as the reference

    python benchmarks/convert_memory.py [--dir /tmp/sgm_jax_convert_bench] [--config sd_2_1]
        [--modes baseline,convert,convert32,load,load16,load16_before] [--keep-files]

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
CONFIGS = REPO / "configs" / "inference"
EXTRAS = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": ((1, 77), np.int64),
          "conditioner.embedders.1.model.logit_scale": ((), np.float16)}
_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def _config(name: str):
    import importlib

    return importlib.import_module(f"sgm_jax.configs.inference.{name}").get_config()


def synthetic_layout(name: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    from sgm_jax.convert.checkpoint import checkpoint_shapes

    shapes = {k: (s, np.dtype(np.float16)) for k, s in checkpoint_shapes(_config(name)).items()}
    if name.startswith("sd_xl_base"):
        shapes.update({k: (s, np.dtype(d)) for k, (s, d) in EXTRAS.items()})
    return shapes


def load_whole_shards(out_dir: Path, dtype: str) -> dict:
    """load_params as it was before the grouped restore: each shard restored whole in its
    stored dtype, then cast leaf by leaf."""
    from sgm_jax.convert.common import flatten_params, unflatten_params
    from sgm_jax.convert.params_dir import PARAMS_SUBDIR, _checkpointer, read_metadata, to_numpy_dtype

    target, checkpointer, flat = to_numpy_dtype(dtype), _checkpointer(), {}
    for name in read_metadata(out_dir)["shards"]:
        shard = checkpointer.restore((out_dir / PARAMS_SUBDIR / name).absolute())
        for path, array in flatten_params(shard).items():
            flat[path] = np.asarray(array).astype(target, copy=False)
        del shard
    return unflatten_params(flat)


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


def child(mode: str, file: Path, out: Path, config: str) -> None:
    """Runs in the measured subprocess; prints one JSON line."""
    start = time.perf_counter()
    if mode == "baseline":
        from sgm_jax.convert.layout import engine_parts

        engine_parts(_config(config))
    elif mode in ("convert", "convert32"):
        from sgm_jax.cli import convert as cli

        dtype = "float32" if mode == "convert32" else "keep"
        rc = cli.main(["--config", str(CONFIGS / f"{config}.py"), "--checkpoint", str(file), "--output", str(out),
                       "--dtype", dtype, "--overwrite"])
        if rc:
            raise SystemExit(rc)
    elif mode.startswith("load"):
        import jax

        from sgm_jax.convert.checkpoint import load_params

        if mode == "load":
            params = load_params(out)
        elif mode == "load16":
            params = load_params(out, dtype="float16")
        else:
            params = load_whole_shards(out, "float16")
        leaves = jax.tree.leaves(params)
        print(f"# loaded {sum(x.size for x in leaves):,} values, {sum(x.nbytes for x in leaves) / 2**30:.2f} GiB",
              file=sys.stderr)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"mode": mode, "peak_rss": peak_kib * 1024, "seconds": time.perf_counter() - start}))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/sgm_jax_convert_bench")
    ap.add_argument("--modes", default="baseline,convert,convert32,load,load16,load16_before")
    ap.add_argument("--config", default="sd_xl_base", help="inference config whose checkpoint layout is used")
    ap.add_argument("--keep-files", action="store_true", help="leave the synthetic file and outputs in --dir")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "FILE", "OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        os.environ["JAX_PLATFORMS"] = "cpu"
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.child[3])
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    file = work / f"{args.config}_f16.safetensors"
    layout = synthetic_layout(args.config)
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
        out = work / ("out_f32" if mode in ("convert32", "load16", "load16_before") else "out_keep")
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(file), str(out), args.config], cwd=REPO,
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
