"""Data loaders yielding numpy batches {"jpg": [B, H, W, C] float32 in [-1, 1], "cls": [B] int32}.

    ds = MnistDataset("../shared/data/mnist", split="train")   # or build_dataset(...)
    for batch in ds.batches(batch_size=512, seed=0, start_step=resumed_step): ...

Batch order depends only on (seed, step), so a resumed run continues with exactly the data
an uninterrupted run would have seen. With several hosts each gets its slice of every
global batch (process_index / process_count; default: jax.process_index/process_count).
"""

from __future__ import annotations

from typing import Any

from sgm_jax.data.base import ArrayDataset, DataSource
from sgm_jax.data.cifar10 import Cifar10Dataset, resolve_cifar10_source
from sgm_jax.data.mnist import MnistDataset, read_idx, resolve_mnist_source

# Dataset names, including the seed's data targets, so its yaml `data.target` maps 1:1.
DATASETS: dict[str, type[ArrayDataset]] = {
    "mnist": MnistDataset,
    "cifar10": Cifar10Dataset,
    "sgm.data.mnist.MNISTLoader": MnistDataset,
    "sgm.data.cifar10.CIFAR10Loader": Cifar10Dataset,
}
# Seed loader arguments that are PyTorch DataLoader details, not data-set choices.
_LOADER_ONLY = frozenset({"batch_size", "num_workers", "prefetch_factor", "shuffle"})


def build_dataset(name: str, **kwargs: Any) -> ArrayDataset:
    """`DATASETS[name](**kwargs)`, ignoring the seed's DataLoader-only arguments
    (batch_size goes to `.batches()` instead)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](**{k: v for k, v in kwargs.items() if k not in _LOADER_ONLY})


__all__ = [
    "ArrayDataset", "Cifar10Dataset", "DATASETS", "DataSource", "MnistDataset", "build_dataset",
    "read_idx", "resolve_cifar10_source", "resolve_mnist_source",
]
