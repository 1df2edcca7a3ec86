"""Class- or text-conditional MNIST quality against training budget.

A small CNN classifier is trained on real held-out digits (MNIST's test split, never seen by
the diffusion model); the diffusion model trains with train.py's loop in budget increments
(resuming each time); after each budget it draws `--per-class` digits of every class and we
report the fraction the classifier assigns to the class asked for. A text-conditional model
(mnist_txt2img) is asked with the captions' HELD-OUT wordings ("a photo of the number seven",
"7, drawn by hand", ...: sgm_jax.data.mnist_captions), never seen in training.

    python benchmarks/mnist_quality.py --config configs/mnist_cond_cpu.py --budgets 2,5,10,15
    python benchmarks/mnist_quality.py --config configs/mnist_txt2img.py --workdir workdir/mnist_txt2img
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

from sgm_jax.evaluation.classifier import ClassifierEvaluator, to_digit_input  # noqa: E402


def draw(workdir: str, per_class: int, sampler: str, steps: int,
         wordings: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """per_class digits of each class: by class id, or by captions in `wordings` for a text
    model. Returns images, labels and each image's wording index (-1: none)."""
    from sgm_jax.data.mnist_captions import caption
    from sgm_jax.inference.workdir import TrainedModel

    model = TrainedModel.load(workdir)
    spec = model.spec(sampler, steps)
    if model.condition_key == "txt":
        per = -(-per_class // len(wordings))
        prompts = [caption(d, w) for d in range(10) for w in wordings]
        labels = np.repeat(np.arange(10), len(wordings) * per)
        wording = np.tile(np.repeat(np.arange(len(wordings)), per), 10)
    else:
        per, prompts, labels = per_class, list(range(10)), np.repeat(np.arange(10), per_class)
        wording = np.full(len(labels), -1)
    result = model.sample(prompts, num=per, seed=1, spec=spec)
    return result.images.astype(np.float32) / 127.5 - 1.0, labels, wording


def main() -> None:
    from ml_collections import config_flags  # noqa: F401  (configs are plain modules here)

    from sgm_jax.data import MnistDataset
    from sgm_jax.training.loop import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_cond_cpu.py")
    parser.add_argument("--workdir", default="/tmp/sgm_jax_mnist_quality")
    parser.add_argument("--budgets", default="2,5,10,15", help="cumulative training minutes")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--sampler", default="dpmpp2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None, help="MNIST IDX folder (default: the usual search)")
    parser.add_argument("--wording", action="append", default=[],
                        help="text models: a caption wording with {word} or {digit} to ask with "
                             "(repeatable; default: the held-out wordings of sgm_jax.data.mnist_captions)")
    args = parser.parse_args()
    from sgm_jax.data.mnist_captions import HELD_OUT_WORDINGS

    wordings = tuple(args.wording) or HELD_OUT_WORDINGS

    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", REPO / args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if "path" in config.data.get("params", {}):
        config.data.params.path = args.data or ""
    config.training.update(sample_every=0)

    held_out = MnistDataset(args.data, split="test")
    t0 = time.time()
    evaluator = ClassifierEvaluator.from_mnist(args.data, split="test", limit=len(held_out) // 64 * 64)
    def classify(images):  # 28x28 digits, or 32x32 padded ones (mnist_txt2img)
        return evaluator.predict(to_digit_input(images))

    print(f"classifier: held-out accuracy {evaluator.accuracy:.4f} ({time.time() - t0:.0f} s); "
          f"data: {held_out.source.describe()}")

    rows, spent = [], 0.0
    for budget in [float(b) for b in args.budgets.split(",")]:
        config.training.max_minutes = budget - spent
        summary = train(config, args.workdir)
        spent += summary["seconds"] / 60.0  # the training loop's wall time, compilation included
        images, labels, wording = draw(args.workdir, args.per_class, args.sampler, args.steps, wordings)
        correct = classify(images) == labels
        acc = float(correct.mean())
        per_class = [float(correct[labels == c].mean()) for c in range(10)]
        rows.append((budget, spent, summary["step"], acc, per_class))
        by_wording = ", ".join(f"{wordings[w]!r}: {correct[wording == w].mean():.3f}"
                               for w in range(len(wordings))) if wording.max() >= 0 else ""
        print(f"budget {budget:.0f} min: step {summary['step']}, accuracy {acc:.3f}"
              + (f" ({by_wording})" if by_wording else ""), flush=True)

    from sgm_jax.data import from_config

    bs = from_config(config.data).batch_size
    print(f"\nconfig {args.config}, batch {bs}, sampler {args.sampler} x {args.steps} steps, "
          f"{args.per_class} digits per class, device {jax.devices()[0].device_kind}")
    print(f"{'budget min':>10}{'train min':>10}{'steps':>8}{'images':>9}{'accuracy':>10}  worst class")
    for budget, spent_, step, acc, per_class in rows:
        worst = int(np.argmin(per_class))
        print(f"{budget:>10.0f}{spent_:>10.1f}{step:>8}{step * bs:>9}{acc:>10.3f}  {worst} ({per_class[worst]:.2f})")


if __name__ == "__main__":
    main()
