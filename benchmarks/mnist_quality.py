"""Class-conditional MNIST quality against training budget.

A small CNN classifier is trained on real held-out digits (MNIST's test split, never seen by
the diffusion model); the diffusion model trains with train.py's loop in budget increments
(resuming each time); after each budget it draws `--per-class` digits of every class and we
report the fraction the classifier assigns to the class asked for.

    python benchmarks/mnist_quality.py --config configs/mnist_cond_cpu.py --budgets 2,5,10,15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sgm_jax.evaluation.classifier import ClassifierEvaluator  # noqa: E402  (the classifier score's evaluator)


def main() -> None:
    from ml_collections import config_flags  # noqa: F401  (configs are plain modules here)

    from sgm_jax.data import MnistDataset
    from sgm_jax.training.loop import train
    from sgm_jax.training.restore import sample_trained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_cond_cpu.py")
    parser.add_argument("--workdir", default="/tmp/sgm_jax_mnist_quality")
    parser.add_argument("--budgets", default="2,5,10,15", help="cumulative training minutes")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--sampler", default="dpmpp2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None, help="MNIST IDX folder (default: the usual search)")
    args = parser.parse_args()

    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", REPO / args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.params.path = args.data or ""
    config.training.update(sample_every=0, num_samples=10, sample_nrow=10)

    held_out = MnistDataset(args.data, split="test")
    t0 = time.time()
    evaluator = ClassifierEvaluator.from_mnist(args.data, split="test", limit=len(held_out) // 64 * 64)
    classify = evaluator.predict
    print(f"classifier: held-out accuracy {evaluator.accuracy:.4f} ({time.time() - t0:.0f} s); "
          f"data: {held_out.source.describe()}")

    rows, spent = [], 0.0
    for budget in [float(b) for b in args.budgets.split(",")]:
        config.training.max_minutes = budget - spent
        summary = train(config, args.workdir)
        spent += summary["seconds"] / 60.0  # the training loop's wall time, compilation included
        images, labels = sample_trained(args.workdir, list(range(10)), args.per_class, sampler=args.sampler,
                                        steps=args.steps, seed=1)
        acc = float((classify(images) == labels).mean())
        per_class = [float((classify(images[labels == c]) == c).mean()) for c in range(10)]
        rows.append((budget, spent, summary["step"], acc, per_class))
        print(f"budget {budget:.0f} min: step {summary['step']}, accuracy {acc:.3f}", flush=True)

    bs = config.data.params.batch_size
    print(f"\nconfig {args.config}, batch {bs}, sampler {args.sampler} x {args.steps} steps, "
          f"{args.per_class} digits per class, device {jax.devices()[0].device_kind}")
    print(f"{'budget min':>10}{'train min':>10}{'steps':>8}{'images':>9}{'accuracy':>10}  worst class")
    for budget, spent_, step, acc, per_class in rows:
        worst = int(np.argmin(per_class))
        print(f"{budget:>10.0f}{spent_:>10.1f}{step:>8}{step * bs:>9}{acc:>10.3f}  {worst} ({per_class[worst]:.2f})")


if __name__ == "__main__":
    main()
