"""Class accuracy of generated digits: a small CNN trained on real MNIST digits that the
diffusion model never saw (MNIST's test split), asked whether each generated image shows the
class it was generated for. Task-specific (28x28 grey digits), cheap, and sharp where FID on
random-weight or ImageNet features says little.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgm_jax.data import MnistDataset
from sgm_jax.evaluation.checks import check_conditioning


class Classifier(nn.Module):
    """`[B, 28, 28, 1]` in [-1, 1] -> logits `[B, 10]`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 3,
                     seed: int = 0) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """(predict, held-out accuracy): trains on the first 85% of the given digits (float
    `[N, 28, 28, 1]` in [-1, 1], int labels `[N]`), measures on the rest. predict: images -> ids."""
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
    apply = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    predict = lambda x: np.asarray(apply(params, np.asarray(x, np.float32)))
    acc = float((predict(images[n_train:]) == labels[n_train:]).mean())
    return predict, acc


def to_digit_input(images: np.ndarray) -> np.ndarray:
    """uint8 (0..255) or float (-1..1) `[N, 28|32, 28|32, 1|3]` -> float32 `[N, 28, 28, 1]` in [-1, 1]
    (32x32 digits are MNIST padded by 2: the centre is cut out)."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)
    x = x[..., None] if x.ndim == 3 else x
    if x.shape[1:3] == (32, 32):  # digits padded to 32x32 (sgm_jax.data.mnist_captions, the f4 autoencoder)
        x = x[:, 2:30, 2:30]
    if x.shape[1:3] != (28, 28):
        raise ValueError(f"the MNIST classifier takes 28x28 digits, got {x.shape[1]}x{x.shape[2]}")
    return x.mean(axis=-1, keepdims=True) if x.shape[-1] == 3 else x


class ClassifierEvaluator:
    """`evaluator(images, classes) -> {"class_accuracy": a, "class_accuracy_min": worst class}`.

    Built from real labelled digits (`MnistDataset(path, split="test")` by default): trains the
    classifier once (a few seconds on a CPU) and records its held-out accuracy in `self.accuracy`.
    """

    name = "classifier"
    needs = "classes"

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], accuracy: float = float("nan")):
        self.predict, self.accuracy = predict, accuracy

    @classmethod
    def from_mnist(cls, path: str | None = None, split: str = "test", epochs: int = 3, seed: int = 0,
                   limit: int | None = None) -> "ClassifierEvaluator":

        data = MnistDataset(path or None, split=split)
        n = len(data) if limit is None else min(limit, len(data))
        predict, acc = train_classifier(to_digit_input(data.images[:n]), data.labels[:n], epochs=epochs, seed=seed)
        return cls(predict, acc)

    def __call__(self, images: np.ndarray, classes: Any) -> dict[str, float]:
        check_conditioning(self, classes, len(images))
        labels = np.asarray([int(c) for c in classes])
        hit = self.predict(to_digit_input(images)) == labels
        per_class = [float(hit[labels == c].mean()) for c in np.unique(labels)]
        return {"class_accuracy": float(hit.mean()), "class_accuracy_min": float(min(per_class))}
