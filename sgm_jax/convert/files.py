"""Checkpoint files: lazy PyTorch-side readers and writers, and the Orbax params directory.

Reading never materialises a whole checkpoint: `.safetensors` is opened with
`safetensors.safe_open(framework="numpy")` and read tensor by tensor (shapes come from the
header, so validation reads no data); `.ckpt` / `.pt` (pickle) files are only opened on an
explicit `allow_pickle=True`, with `torch.load(weights_only=True, mmap=True)`.

The converted model is an Orbax directory:
    OUT/params/         Orbax PyTree checkpoint of the engine params tree (numpy leaves)
    OUT/metadata.json   what was converted from what (see `save_params`)
written atomically: everything goes to a hidden sibling temp dir that is renamed into
place only when complete, so a failed or interrupted conversion leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

PARAMS_SUBDIR = "params"
METADATA_FILE = "metadata.json"
FORMAT = "sgm_jax.params"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAVE_CONCURRENT_GB = 1
RESTORE_CONCURRENT_GB = 4


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read (absent, truncated, corrupt, refused format)."""


# ----------------------------------------------------------------------------- reading


# safetensors dtype names -> numpy (little-endian, as the format stores them).
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """A `.safetensors` file as a lazy `{key: np.ndarray}` mapping (one tensor read per access).

    Opened with `safetensors.safe_open(framework="numpy")`, which validates the header
    (a truncated or corrupt file fails here); `shape_of(key)` / `dtype_of(key)` read only
    the header. Tensor data is read with plain `readinto` at the header's offsets rather
    than through safetensors' memory map: the mapped file pages would otherwise stay
    resident and count as a second copy of the checkpoint in the process's RSS.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            self._keys = tuple(self._file.keys())
            self._fh = open(self.path, "rb", buffering=0)
            header_len = int.from_bytes(self._fh.read(8), "little")
            self._header = json.loads(self._fh.read(header_len))
            self._data_start = 8 + header_len
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFileError(f"{self.path}: not a readable safetensors file "
                                      f"(truncated or corrupt?): {_one_line(e)}") from None

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        info = self._header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:  # a rare dtype (e.g. float8): let safetensors decode it
            return self._file.get_tensor(key)
        begin, end = info["data_offsets"]
        array = np.empty(info["shape"], dtype)
        self._fh.seek(self._data_start + begin)
        if self._fh.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
            raise CheckpointFileError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._file.get_slice(key).get_shape())

    def dtype_of(self, key: str) -> str:
        return str(self._file.get_slice(key).get_dtype())

    def metadata(self) -> dict[str, str]:
        return dict(self._file.metadata() or {})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None


class TorchCheckpoint(Mapping[str, np.ndarray]):
    """A pickled PyTorch state dict (`{"state_dict": {...}}` or flat), memory-mapped;
    tensors become numpy on access (bfloat16 via ml_dtypes)."""

    def __init__(self, path: str | os.PathLike):
        try:
            import torch
        except ImportError:
            raise CheckpointFileError(f"{path}: reading a pickled checkpoint needs PyTorch "
                                      "(pip install 'sgm_jax[torch]'), or convert it to .safetensors") from None
        self.path = Path(path)
        try:
            obj = self._load(torch, path, mmap=True)
        except CheckpointFileError as e:
            if "mmap" not in str(e):
                raise
            obj = self._load(torch, path, mmap=False)  # legacy (non-zip) torch.save format cannot be mapped
        sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
        if not isinstance(sd, Mapping):
            raise CheckpointFileError(f"{path}: no state dict inside (got {type(obj).__name__})")
        self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def _load(torch: Any, path: Any, mmap: bool) -> Any:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            raise CheckpointFileError(f"{path}: cannot load checkpoint safely (weights_only): {_one_line(e)}") from None

    def __getitem__(self, key: str) -> np.ndarray:
        import torch

        t = self._sd[key].detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, key: object) -> bool:
        return key in self._sd

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def close(self) -> None:
        self._sd = {}


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """A lazy `{seed key: np.ndarray}` view of a checkpoint file (with `shape_of(key)`).

    `.safetensors`: always. `.ckpt` / `.pt` / `.pth` / `.bin`: only with `allow_pickle=True`
    (pickle can run code; loading uses torch's weights_only unpickler, memory-mapped).
    Raises CheckpointFileError with a one-line reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointFileError(
                f"{path}: refusing to unpickle a {path.suffix} file; pass --allow-pickle (allow_pickle=True) "
                "if you trust it, or convert it to .safetensors")
        return TorchCheckpoint(path)
    raise CheckpointFileError(f"{path}: unknown checkpoint format {path.suffix!r} "
                              f"(expected .safetensors, or {'/'.join(PICKLE_SUFFIXES)} with --allow-pickle)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------- writing


def _sibling_temp(path: Path, tag: str) -> Path:
    # Same parent: the final rename stays on one file system, hence atomic.
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is replaced only with `overwrite`
    and is kept (renamed back) if the swap fails."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite / overwrite=True to replace it)")
    old = _sibling_temp(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before a long conversion) when `out_dir` exists and may not be replaced."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite / overwrite=True to replace it)")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of {out} does not exist")
    return out


def save_params(params: Mapping[str, Any], out_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                *, overwrite: bool = False) -> Path:
    """Write `params` (nested dict of arrays) as an Orbax directory, atomically.

    `metadata` (JSON-serialisable) is stored in metadata.json with `format`,
    `format_version`, `num_params`, `num_tensors` and `dtypes` added. Refuses to replace an
    existing `out_dir` unless `overwrite`. On any failure `out_dir` is left untouched and
    the temp dir removed.
    """
    out = check_output(out_dir, overwrite).absolute()
    leaves = [np.asarray(x) for x in _leaves(params)]
    meta = dict(metadata or {})
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, num_params=int(sum(x.size for x in leaves)),
                num_tensors=len(leaves), dtypes=sorted({str(x.dtype) for x in leaves}))
    tmp = _sibling_temp(out, "tmp")
    tmp.mkdir()
    try:
        _checkpointer().save(tmp / PARAMS_SUBDIR, _as_numpy_tree(params))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        _commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    # Orbax by default lets up to 96 GB be in flight, i.e. it copies the whole tree into
    # write buffers at once: 2x the model in RAM. 1 GB keeps a 7 GB save near 1x.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB,
                                          restore_concurrent_gb=RESTORE_CONCURRENT_GB)
    return ocp.Checkpointer(handler)


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, Mapping):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _as_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def read_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata.json of a directory written by `save_params`."""
    path = Path(out_dir) / METADATA_FILE
    if not path.is_file():
        raise CheckpointFileError(f"{out_dir}: not an sgm_jax params directory (no {METADATA_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointFileError(f"{out_dir}: {METADATA_FILE} is not of format {FORMAT!r}")
    return meta


def load_params(out_dir: str | os.PathLike, *, dtype: Any = None) -> dict[str, Any]:
    """The params tree saved by `save_params`: `{"model": ..., "conditioner": ..., "first_stage": ...}`
    of numpy arrays (host memory; `jax.device_put` them or pass to jit). `dtype` ("float32",
    "bfloat16", "float16" or a numpy dtype) casts floating leaves; None keeps the stored dtype."""
    read_metadata(out_dir)
    params_dir = (Path(out_dir) / PARAMS_SUBDIR).absolute()
    tree = _checkpointer().restore(params_dir)
    if dtype is None:
        return tree
    target = to_numpy_dtype(dtype)
    return _map(tree, lambda x: x.astype(target) if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
                else x)


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(np.asarray(tree))


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """"float32" / "bfloat16" / "float16" / numpy or jax dtype -> numpy dtype (bfloat16 via ml_dtypes)."""
    if isinstance(dtype, str):
        names = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
        return np.dtype(names[dtype])
    return np.dtype(dtype)


def save_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a flat `{key: array}` state dict as `.safetensors`, atomically (temp file + rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --overwrite / overwrite=True to replace it)")
    tmp = _sibling_temp(path, "tmp")
    try:
        tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
