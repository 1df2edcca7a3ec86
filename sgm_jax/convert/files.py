"""PyTorch-side checkpoint files: lazy readers and the `.safetensors` writer.

Reading never materialises a whole checkpoint: `.safetensors` is opened with
`safetensors.safe_open(framework="numpy")` and read tensor by tensor (shapes come from the
header, so validation reads no data); `.ckpt` / `.pt` (pickle) files are only opened on an
explicit `allow_pickle=True`, with `torch.load(weights_only=True, mmap=True)`.
The converted (Orbax) side is in `sgm_jax.convert.params_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from sgm_jax.convert.atomic import commit, remove_path, remove_stale_temps, sibling_temp

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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


def save_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a flat `{key: array}` state dict as `.safetensors`, atomically (temp file + rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --overwrite / overwrite=True to replace it)")
    remove_stale_temps(path)
    tmp = sibling_temp(path, "tmp")  # same file system: atomic rename
    try:
        tensors = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # keeps 0-d arrays 0-d
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        commit(tmp, path, overwrite)
    except BaseException:
        remove_path(tmp)
        raise
    return path
