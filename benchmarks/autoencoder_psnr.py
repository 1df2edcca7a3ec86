"""Held-out PSNR of the MNIST autoencoder (configs/autoencoder_mnist.py) against CPU minutes.

    nice -n 5 python benchmarks/autoencoder_psnr.py --budgets 1,2,5,10 [--eval-examples 1000]

Drives AutoencoderTask exactly as train.py does (same config, data order, jitted step) and, at
each budget of process CPU time spent in training steps (compilation included, evaluation
excluded), evaluates on held-out MNIST test digits: PSNR / SSIM / L1 of the trained weights and
of their EMA. CPU time, not wall time, so a shared machine measures the same. Prints a markdown
table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import jax


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(budgets_min: list[float], eval_examples: int, overrides: dict) -> list[dict]:
    from sgm_jax import data
    from sgm_jax.training.autoencoder_task import AutoencoderTask
    from sgm_jax.configs import autoencoder_mnist

    config = autoencoder_mnist.get_config()
    config.training.eval_examples = eval_examples
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    dataset = data.from_config(config.data)
    task = AutoencoderTask(config, dataset)
    seed = int(config.training.seed)
    state = jax.jit(task.init_state)(jax.random.key(seed), dataset.example_batch(2))
    step_fn = jax.jit(task.train_step, donate_argnums=0)
    base_key = jax.random.fold_in(jax.random.key(seed), 1)
    it = dataset.iterator(dataset.batch_size, seed=seed)
    spent, rows, step, wall0 = 0.0, [], 0, time.time()
    for budget in sorted(budgets_min):
        while spent < budget * 60.0:
            t0 = cpu_seconds()
            for _ in range(25):
                state, metrics = step_fn(state, next(it), jax.random.fold_in(base_key, step))
                step += 1
            jax.block_until_ready(state)
            spent += cpu_seconds() - t0
        ev = task.evaluate(state, step)
        row = {"cpu_min": budget, "steps": step, "images": step * dataset.batch_size,
               "psnr": ev["psnr"], "ssim": ev["ssim"], "l1": ev["l1"], "ema_psnr": ev.get("ema/psnr"),
               "ema_ssim": ev.get("ema/ssim"), "train_rec": float(metrics["loss/rec"]),
               "disc_loss": float(metrics["loss/disc"]), "wall_min": (time.time() - wall0) / 60.0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="1,2,5,10", help="CPU minutes at which to evaluate")
    parser.add_argument("--eval-examples", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], help="config override a.b.c=value")
    parser.add_argument("--json", default="", help="write the rows here")
    args = parser.parse_args()
    overrides = dict(s.split("=", 1) for s in args.set)
    rows = run([float(b) for b in args.budgets.split(",")], args.eval_examples, overrides)
    print(f"\nMNIST autoencoder (configs/autoencoder_mnist.py{' + ' + ', '.join(args.set) if args.set else ''}), "
          f"{os.cpu_count()} CPUs, held-out test digits: {args.eval_examples}")
    print("| CPU min | steps | PSNR dB | EMA PSNR dB | SSIM | EMA SSIM | L1 | wall min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cpu_min']:g} | {r['steps']} | {r['psnr']:.2f} | {r['ema_psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['ema_ssim']:.3f} | {r['l1']:.4f} | {r['wall_min']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
