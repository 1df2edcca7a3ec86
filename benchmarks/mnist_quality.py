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
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 28, 28, 1] in [-1, 1]
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 3, seed: int = 0):
    """Returns (params, held-out accuracy): trains on 85% of the given digits."""
    n_train = int(0.85 * len(images))
    model, tx = Classifier(), optax.adam(1e-3)
    params = model.init(jax.random.key(seed), images[:1])
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n_train)
        for i in range(0, n_train - 63, 64):
            idx = order[i:i + 64]
            params, opt = step(params, opt, images[idx], labels[idx])
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    acc = float((np.asarray(predict(params, images[n_train:])) == labels[n_train:]).mean())
    return (lambda x: np.asarray(predict(params, x))), acc


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
    batch = held_out.batch_at(0, len(held_out) // 64 * 64, shuffle=False)
    t0 = time.time()
    classify, clf_acc = train_classifier(batch["jpg"], batch["cls"])
    print(f"classifier: held-out accuracy {clf_acc:.4f} ({time.time() - t0:.0f} s); data: {held_out.source.describe()}")

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
