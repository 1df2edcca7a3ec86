"""Compile every config for the TPU slices the README sizes it for, without TPUs, and write the table
in benchmarks/RESULTS.md ("Pod-scale compile check").

    python benchmarks/compile_tpu.py                      # every row not yet in benchmarks/compile_tpu/
    python benchmarks/compile_tpu.py --rows sdxl_finetune@v5p:2x2x1 --force
    python benchmarks/compile_tpu.py --table-only         # rebuild the table from the saved reports

Each row is one `python -m sgm_jax.compile_check ... --json` (needs `pip install libtpu`); its report
is saved as benchmarks/compile_tpu/<row>.json with the wall time of the whole command, so a long
campaign can be stopped and resumed. Full-size SDXL compiles take many minutes on a small machine:
this is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "compile_tpu"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- compile_tpu:begin -->", "<!-- compile_tpu:end -->"
GiB = 2**30

SDXL = "inference/sd_xl_base"
FROZEN_F32 = "--config.training.frozen_dtype=float32"  # sdxl_lora's base as it was held before 2026-12-04
# sdxl_finetune's mesh as it was before 2026-12-04 #2: XLA:TPU's collective-matmul loops over the FSDP-split weights
COLLECTIVE_MATMUL = "--config.mesh.collective_matmul=true"
B64 = "--config.data.params.train.loader.batch_size=64"
B256 = "--config.data.params.train.loader.batch_size=256"
SAMPLE_SDXL = ("--job", "sample", "--width", "1024", "--height", "1024", "--steps", "30")
# (config, topology, extra arguments, what the README / issue sizes it for)
ROWS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("sdxl_finetune", "v5p:2x2x1", (), "v5p-8 (4 chips)"),
    ("sdxl_finetune", "v5p:2x2x1", (COLLECTIVE_MATMUL,), "v5p-8 (4 chips), collective matmuls"),
    # the config's batch 32 does not divide over 64 chips: 4 per chip, as on one 8-chip host
    ("sdxl_finetune", "v5p:4x4x4", (B256,), "64 v5p chips, 16 hosts"),
    ("sdxl_finetune", "v5p:4x4x4", (B256, COLLECTIVE_MATMUL), "64 v5p chips, 16 hosts, collective matmuls"),
    ("sdxl_finetune", "v6e:2x4", (), "v6e-8"),
    ("sdxl_finetune", "v6e:2x4", (COLLECTIVE_MATMUL,), "v6e-8, collective matmuls"),
    # 8 images per chip, as on v5p-8: twice the FLOPs per weight read (the 4-per-chip row is memory-bound)
    ("sdxl_finetune", "v6e:2x4", (B64,), "v6e-8, batch 64"),
    ("sdxl_finetune", "v6e:2x4", (B64, COLLECTIVE_MATMUL), "v6e-8, batch 64, collective matmuls"),
    ("sdxl_lora", "v5e:2x2", (), "v5e-4"),
    ("sdxl_lora", "v5e:2x2", (FROZEN_F32,), "v5e-4, frozen base in float32"),
    ("sdxl_lora", "v6e:1x1", (), "v6e-1"),
    ("imagenet_f8_cond", "v5e:2x4", (), "v5e-8"),
    ("txt2img_clipl", "v5e:2x4", (), "v5e-8"),
    ("autoencoder_kl_f4", "v5e:2x4", (), "v5e-8"),
    *[(SDXL, f"{gen}:1x1", SAMPLE_SDXL + ("--num", str(n)), f"{gen}-1, 1024², 30 steps CFG, batch {n}")
      for gen in ("v5e", "v6e") for n in (1, 4, 8)],
    # float32 weights leave 8 images at a time 0.34 GiB short on a v5e chip
    (SDXL, "v5e:1x1", SAMPLE_SDXL + ("--num", "8", "--param-dtype", "bfloat16"),
     "v5e-1, 1024², 30 steps CFG, batch 8, bfloat16 weights"),
    ("inference/sd_2_1_768", "v5e:1x1", ("--job", "sample", "--steps", "30", "--num", "1"),
     "v5e-1, 768², 30 steps CFG, batch 1"),
]

# Published figures a user compares with (sources in RESULTS.md). None found for training steps.
PUBLISHED = {
    "inference.sd_xl_base@v5e:1x1@b1": "HF blog sdxl_jax (2023-10-03): v5e-4, 4 images 1024² (1 per chip) in ~2.3 s",
}


# a row's extra flag -> its id's suffix (rows of one config and slice differ by these)
ROW_SUFFIXES = {FROZEN_F32: "@frozen_f32", "--param-dtype": "@bf16", B64: "@b64",
                COLLECTIVE_MATMUL: "@collective_matmul"}


def row_id(config: str, topology: str, extra: tuple[str, ...]) -> str:
    num = extra[extra.index("--num") + 1] if "--num" in extra else None
    return (f"{config.replace('/', '.')}@{topology}" + (f"@b{num}" if num else "")
            + "".join(suffix for flag, suffix in ROW_SUFFIXES.items() if flag in extra))


def file_of(rid: str) -> Path:
    return OUT / (re.sub(r"[^A-Za-z0-9_.@-]", "_", rid) + ".json")


def run_row(config: str, topology: str, extra: tuple[str, ...]) -> dict:
    cmd = [sys.executable, "-m", "sgm_jax.compile_check", "--config", config, "--topology", topology, *extra, "--json"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    wall = time.time() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        # the CLI's one "error:" line names the cause; XLA's own last line is often only a link to its docs
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1])
        return {"error": last.removeprefix("error: "), "wall_seconds": wall,
                "command": " ".join(cmd[1:])}
    report = json.loads(lines[-1])
    report.update(wall_seconds=wall, exit_code=proc.returncode, command=" ".join(cmd[1:-1]))
    return report


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def table(rows: list[tuple[str, str, tuple[str, ...], str]]) -> str:
    head = ("| config | slice | job | HBM/chip GiB: params + opt + frozen / temp / total of cap | fits | "
            "TFLOP/step/chip | GB/step/chip | est. s/step (bound) | est. MFU | est. img/s | compile s | published |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for config, topo, extra, label in rows:
        rid = row_id(config, topo, extra)
        path = file_of(rid)
        published = PUBLISHED.get(rid, "none found")
        if not path.is_file():
            out.append(f"| {config} | {topo} ({label}) | | not run yet | | | | | | | | {published} |")
            continue
        r = json.loads(path.read_text())
        if "error" in r:
            out.append(f"| {config} | {topo} ({label}) | | error: {r['error'][:120]} | | | | | | | "
                       f"{r['wall_seconds']:.0f} | {published} |")
            continue
        g = r["groups"]
        state = sum(v for k, v in g.items() if k != "batch")
        parts = " + ".join(_g(g[k]) for k in ("parameters", "optimizer state", "frozen parameters", "first stage",
                                                "EMA parameters", "discriminator", "discriminator optimizer")
                           if k in g)
        job = f"{r['job']} b{r['images_per_step']}"
        mem = f"{parts} (= {_g(state)}) / {_g(r['temp_bytes'])} / {_g(r['total_bytes'])} of {r['hbm_bytes'] / GiB:.0f}"
        if r.get("compiler_error"):  # XLA:TPU refused it for lack of HBM: its temp figure, no cost
            usable = r.get("usable_bytes") or r["hbm_bytes"]
            mem = f"{parts} (= {_g(state)}) / {_g(r['temp_bytes'])} / {_g(r['total_bytes'])} of {_g(usable)} usable"
            out.append(f"| {config} | {topo} ({label}) | {job} | {mem} (XLA:TPU out of HBM) | **no** | | | | | | "
                       f"{r['compile_seconds']:.0f} ({r['wall_seconds']:.0f} wall) | {published} |")
            continue
        if not r.get("compiled", True):  # arguments only (--args-only, or they alone exceed HBM)
            mem = f"{parts} (= {_g(state)}) / not compiled / args {_g(r['argument_bytes'])} of {r['hbm_bytes'] / GiB:.0f}"
            out.append(f"| {config} | {topo} ({label}) | {job} | {mem} | {'args fit' if r['fits'] else '**no**'} "
                       f"| | | | | | {r['wall_seconds']:.0f} wall | {published} |")
            continue
        out.append(f"| {config} | {topo} ({label}) | {job} | {mem} | {'yes' if r['fits'] else '**no**'} | "
                   f"{r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.1f} | {r['step_seconds']:.3f} "
                   f"({r['bound']}) | {r['mfu'] * 100:.0f}% | {r['images_per_second']:.2f} | "
                   f"{r['compile_seconds']:.0f} ({r['wall_seconds']:.0f} wall) | {published} |")
    return "\n".join(out)


def write_results(text: str) -> None:
    body = RESULTS.read_text() if RESULTS.is_file() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="comma-separated row ids (config@topology[@bN]); default all")
    p.add_argument("--force", action="store_true", help="recompile rows that have a saved report")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the saved reports")
    p.add_argument("--args-only", action="store_true",
                   help="rows without a saved report: the arguments' bytes only, no compile (seconds each)")
    args = p.parse_args()
    wanted = set(args.rows.split(",")) if args.rows else None
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for config, topo, extra, _ in ROWS:
            rid = row_id(config, topo, extra)
            if (wanted and rid not in wanted) or (file_of(rid).is_file() and not args.force):
                continue
            print(f"{rid}: compiling ...", flush=True)
            report = run_row(config, topo, extra + (("--args-only",) if args.args_only else ()))
            file_of(rid).write_text(json.dumps(report, indent=1))
            print(f"{rid}: {report.get('error') or 'done'} in {report['wall_seconds']:.0f} s", flush=True)
    write_results(table(ROWS))
    print(table(ROWS))


if __name__ == "__main__":
    main()
