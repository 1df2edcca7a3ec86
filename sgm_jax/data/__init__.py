"""Data for training: in-memory toy sets (MNIST, CIFAR-10) and streaming image / image-text
sources (webdataset tar shards, ArrayRecord, tfds data_source) behind one interface.

    ds = from_config(config.data)                 # the training loop's entry point
    it = ds.iterator(ds.batch_size, seed=0, start_step=0)
    batch = next(it)        # this host's part of the next global batch (dict of numpy arrays)
    state = it.get_state()  # JSON; it.set_state(state) later resumes exactly there

Every dataset has `.batch_size` (the global batch size of the config), `.iterator(...)`,
`.example_batch(n)`, `.image_shape`, `.source.describe()` and `.steps_per_epoch(batch_size)`
(None for streams). With several hosts each gets its slice of every global batch
(process_index / process_count; default: jax.process_index/process_count).
"""

from __future__ import annotations

from typing import Any, Mapping

from sgm_jax.data.base import (
    ArrayDataset,
    DataSource,
    SourcedArrayDataset,
    StepIterator,
    to_model_range,
)
from sgm_jax.data.cifar10 import Cifar10Dataset, resolve_cifar10_source
from sgm_jax.data.mnist import MnistDataset, read_idx, resolve_mnist_source
from sgm_jax.data.streaming import streaming_from_config
from sgm_jax.data.synthetic import SyntheticDataset
from sgm_jax.diffusion.registry import to_plain
from sgm_jax.errors import UserError

# Dataset names, including the seed's data targets, so its yaml `data.target` maps 1:1.
DATASETS: dict[str, type[ArrayDataset]] = {
    "mnist": MnistDataset,
    "cifar10": Cifar10Dataset,
    "sgm.data.mnist.MNISTLoader": MnistDataset,
    "sgm.data.cifar10.CIFAR10Loader": Cifar10Dataset,
}
# The seed's streaming data module (webdataset shards via its `sdata` package) and our
# short names for the same: all read `params.train.datapipeline` / `params.train.loader`.
STREAMING_TARGETS = frozenset({"sgm.data.dataset.StableDataModuleFromConfig", "StableDataModuleFromConfig",
                               "webdataset", "arrayrecord", "tfds"})
# Seed loader arguments that are PyTorch DataLoader details, not data-set choices.
_LOADER_ONLY = frozenset({"batch_size", "num_workers", "prefetch_factor", "shuffle"})


def build_dataset(name: str, **kwargs: Any) -> ArrayDataset:
    """`DATASETS[name](**kwargs)`, ignoring the seed's DataLoader-only arguments
    (batch_size goes to `.batches()` instead)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](**{k: v for k, v in kwargs.items() if k not in _LOADER_ONLY})


def from_config(
    data_config: Mapping[str, Any],
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Any:
    """The dataset a config's `data` section describes, with `.batch_size` set to its global
    batch size. In-memory targets (the seed's MNISTLoader / CIFAR10Loader) take
    `params.path` ("" = search the usual places; a path given must hold the data);
    streaming targets read the seed's `params.train.datapipeline` / `loader` layout."""

    config = to_plain(data_config)
    if not isinstance(config, Mapping) or "target" not in config:
        raise UserError(f"config.data needs a 'target' (one of {sorted(DATASETS) + sorted(STREAMING_TARGETS)})")
    target, params = str(config["target"]), dict(config.get("params") or {})
    if target == "synthetic":
        return SyntheticDataset(process_index=process_index, process_count=process_count, **params)
    if target in STREAMING_TARGETS:
        return streaming_from_config(target, params, split=split, process_index=process_index,
                                     process_count=process_count)
    if target not in DATASETS:
        raise UserError(f"unknown data.target {target!r}; known: {', '.join(sorted(DATASETS) + sorted(STREAMING_TARGETS))}")
    batch_size = int(params.get("batch_size", 64))
    if batch_size <= 0:
        raise UserError(f"data.params.batch_size must be positive, got {batch_size}")
    kwargs = {k: v for k, v in params.items() if k not in _LOADER_ONLY}
    kwargs["path"] = kwargs.get("path") or None  # "" (overridable on the CLI) = search
    dataset = DATASETS[target](split=split, process_index=process_index, process_count=process_count, **kwargs)
    dataset.batch_size = batch_size
    if batch_size > len(dataset):
        raise UserError(f"data.params.batch_size {batch_size} exceeds the {len(dataset)} examples of {dataset.source.describe()}")
    return dataset


__all__ = [
    "ArrayDataset", "Cifar10Dataset", "DATASETS", "DataSource", "MnistDataset", "SourcedArrayDataset",
    "StepIterator", "build_dataset", "from_config", "read_idx", "resolve_cifar10_source", "resolve_mnist_source",
    "to_model_range",
]
