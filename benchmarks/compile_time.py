"""Compile time, cold against warm (JAX persistent compilation cache), each run in a fresh process.

    python benchmarks/compile_time.py                 # both targets, 2 repeats
    python benchmarks/compile_time.py --targets mnist_train --repeats 3

Targets:
  mnist_train  the jitted train step of configs/mnist_cond.py, exactly as train.py builds it
               (sgm_jax.training.loop.build_run: conditioner + EDM loss + UNet + AdamW; batch 64)
  mid_sampler  a 50-step EulerEDMSampler loop (EDM discretization, VanillaCFG 5.0, one lax.scan)
               around the SD-like mid UNet of benchmarks/unet_speed.py (latents 4x32x32x4,
               context 77x768), jitted as one function

Each measurement is a fresh `python` subprocess (no in-memory cache): `trace+lower` is
`jax.jit(f).lower(...)` (Python tracing and StableHLO emission, never cached), `compile` is
`.compile()` (XLA; with the persistent cache on, a hit loads the executable instead). Modes:
  cold           no persistent cache
  cold+populate  persistent cache on, empty (a fresh temp dir): compiles and writes the entry
  warm           persistent cache on, populated by the previous run: a cache hit
Cache settings: jax_compilation_cache_dir=<tempdir>, jax_persistent_cache_min_compile_time_secs=0,
jax_persistent_cache_min_entry_size_bytes=0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("mnist_train", "mid_sampler")


def _dir_stats(path: str | None) -> tuple[int, int]:
    if not path or not os.path.isdir(path):
        return 0, 0
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def build_mnist_train():
    """(jitted step, args) for the mnist_cond train step as train.py builds it (batch 64)."""
    import jax

    from sgm_jax.configs import mnist_cond
    from sgm_jax import parallel
    from sgm_jax.training.loop import build_run

    config = mnist_cond.get_config()
    config.data.params.batch_size = 64
    run = build_run(config)
    batch = parallel.shard_batch(run.dataset.batch_at(0, run.batch_size, 0), run.mesh)
    nonfinite = run.nonfinite_start()
    return run.step_fn, (run.abstract_with_sharding(), batch, jax.random.key(0), nonfinite, None)


def build_mid_sampler(steps: int = 50):
    """(jitted sampling loop, abstract args): EulerEDM, 50 steps, CFG, around the mid UNet."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch_peer  # only its config table; torch is not imported

    from sgm_jax.diffusion import Denoiser, EDMDiscretization, EDMScaling, EulerEDMSampler, VanillaCFG
    from sgm_jax.nn.unet import UNetModel

    sgm, _ = torch_peer.mid_configs()
    model = UNetModel(**sgm)
    sampler = EulerEDMSampler(num_steps=steps, discretization=EDMDiscretization(), guider=VanillaCFG(5.0))
    denoiser = Denoiser(scaling=EDMScaling())

    def sample(params, noise, cond, uc):
        def network(x, c_noise, c):
            return model.apply({"params": params}, x, c_noise, context=c["crossattn"])

        return sampler(lambda x, s, c: denoiser(network, x, s, c), noise, cond, uc)

    params = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))["params"]
    b, seq = 4, 77
    noise = jax.ShapeDtypeStruct((b, 32, 32, 4), jnp.float32)
    ctx = {"crossattn": jax.ShapeDtypeStruct((b, seq, 768), jnp.float32)}
    return jax.jit(sample), (params, noise, ctx, ctx)


def child(target: str, cache_dir: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    t_start = time.perf_counter()
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    events: dict[str, int] = {}

    def count(name: str, **kw) -> None:
        if name.startswith("/jax/compilation_cache/"):
            key = name.rsplit("/", 1)[-1]
            events[key] = events.get(key, 0) + 1

    jax.monitoring.register_event_listener(count)
    jax.devices()  # backend start-up is not compile time
    t_import = time.perf_counter() - t_start
    fn, args = (build_mnist_train if target == "mnist_train" else build_mid_sampler)()
    before = _dir_stats(cache_dir)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    after = _dir_stats(cache_dir)
    del compiled
    print("RESULT " + json.dumps({
        "target": target, "trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
        "import_s": t_import, "cache_files": after[0], "cache_bytes": after[1], "new_files": after[0] - before[0],
        "cache_hits": events.get("cache_hits", 0), "cache_misses": events.get("cache_misses", 0),
        "jax": jax.__version__, "platform": jax.devices()[0].platform,
    }), flush=True)


def run_child(target: str, cache_dir: str | None, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", target] + (["--cache-dir", cache_dir] if cache_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{target} child failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--repeats", type=int, default=2, help="cold / populate / warm triples per target")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.cache_dir)
        return
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    rows = []
    for target in args.targets.split(","):
        runs: dict[str, list[dict]] = {"cold": [], "cold+populate": [], "warm": []}
        for _ in range(args.repeats):
            cache = tempfile.mkdtemp(prefix="jax_cc_")
            try:
                runs["cold"].append(run_child(target, None, args.timeout))
                runs["cold+populate"].append(run_child(target, cache, args.timeout))
                runs["warm"].append(run_child(target, cache, args.timeout))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            for mode, r in runs.items():
                r = r[-1]
                print(f"{target:12s} {mode:14s} trace+lower {r['trace_lower_s']:6.2f} s  compile {r['compile_s']:7.2f} s"
                      f"  total {r['total_s']:7.2f} s  cache files {r['cache_files']} ({r['cache_bytes'] / 1e6:.1f} MB)"
                      f"  hits {r['cache_hits']} misses {r['cache_misses']}"
                      f"  load {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        best = {mode: min(rs, key=lambda r: r["total_s"]) for mode, rs in runs.items()}
        rows.append((target, best))
    print(f"\nbest of {args.repeats} fresh processes each:")
    print("| target | mode | trace+lower s | compile s | total s | speed-up vs cold | cache dir size |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for target, best in rows:
        cold = best["cold"]["total_s"]
        for mode, r in best.items():
            entry = f"{r['cache_bytes'] / 1e6:.1f} MB" if r["cache_files"] else "-"
            print(f"| {target} | {mode} | {r['trace_lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} "
                  f"| {cold / r['total_s']:.1f}x | {entry} |")


if __name__ == "__main__":
    main()
