"""CIFAR-10 for the toy configs (the seed's sgm/data/cifar10.py, without torchvision).

Sources, first available wins (`resolve_cifar10_source` says which):
  1. "pickle": the standard python version, a `cifar-10-batches-py` folder (data_batch_1..5,
               test_batch) given as `path` or as its parent; with no path,
               $SGM_JAX_CIFAR10_DIR, ~/.cache/sgm_jax, or .data (the seed's torchvision root);
  2. "tfds":   tensorflow-datasets "cifar10" (already prepared, or downloaded when online).
Examples: {"jpg": [32, 32, 3] float32 in [-1, 1], "cls": int32 in 0..9}.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np

from sgm_jax.data.base import DataSource, SourcedArrayDataset, load_tfds, search_source, tfds_location

log = logging.getLogger(__name__)

ENV_VAR = "SGM_JAX_CIFAR10_DIR"
BATCHES_DIR = "cifar-10-batches-py"
_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def find_cifar10_dir(path: str | os.PathLike) -> Path | None:
    """The `cifar-10-batches-py` folder at or directly under `path`, or None."""
    p = Path(path).expanduser()
    for d in (p, p / BATCHES_DIR):
        if all((d / f).is_file() for f in _FILES["train"] + _FILES["test"]):
            return d
    return None


def read_cifar10_pickles(directory: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) from the python-pickle batches.

    Each batch stores b"data" [n, 3072] (the red, green, then blue 32x32 planes) and b"labels".
    """
    images, labels = [], []
    for name in _FILES[split]:
        with open(Path(directory) / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{directory}/{name}: data has shape {data.shape}, expected [n, 3072]")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planar CHW -> HWC
        labels.append(np.asarray(batch[b"labels"], np.int32))
    return np.concatenate(images), np.concatenate(labels)


def resolve_cifar10_source(
    path: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    tfds_data_dir: str | None = None,
) -> DataSource:
    """The CIFAR-10 source that will be used. A `path` given must hold the batches (UserError
    otherwise); only path None searches. FileNotFoundError (one line) when the search finds none."""
    dirs = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    dirs += [Path.home() / ".cache" / "sgm_jax", Path(".data")]
    found = search_source("cifar10", None if path is None else str(path), split,
                          find=lambda d, s: find_cifar10_dir(d), default_dirs=dirs, kind="pickle",
                          tfds_name="cifar10", download=download, tfds_data_dir=tfds_data_dir,
                          what=f"CIFAR-10 python batches ({BATCHES_DIR})")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no CIFAR-10 source: no {BATCHES_DIR} folder in {', '.join(str(d) for d in dirs)}, and "
        f"tensorflow-datasets 'cifar10' is not prepared or downloadable (set ${ENV_VAR})"
    )


def load_cifar10(source: DataSource, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of `split` from a resolved source."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source.kind == "pickle":
        return read_cifar10_pickles(source.location, split)
    if source.kind == "tfds":
        return load_tfds("cifar10", split, tfds_location(source))
    raise ValueError(f"unknown CIFAR-10 source kind {source.kind!r}")


class Cifar10Dataset(SourcedArrayDataset):
    """CIFAR-10 `split` held in memory: Cifar10Dataset(path=None, split="train", *, download,
    tfds_data_dir, process_index, process_count); see ArrayDataset for the batching."""

    resolve = staticmethod(resolve_cifar10_source)
    load = staticmethod(load_cifar10)
