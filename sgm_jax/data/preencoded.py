"""The pre-encoded sample format: what `python -m sgm_jax.cli.preencode` writes and the streaming
pipeline reads with `datapipeline.preencoded = True` (no JAX here: Grain workers import it).

One webdataset sample per training image, its members named `<key>.<field>`:

    first_stage_moments.npy  [h, w, 2 * embed_dim] the first stage's encoder output (mean, logvar)
                             before sampling: the trainer draws a fresh posterior sample every step
    embedding_<i>_<j>.npy    output j of frozen embedder i for this example ([T, D] crossattn, [D] vector)
    txt / cls                captions and class labels, as in raw shards (trainable embedders, grids)
    <field>.npy              any other embedder input (original_size_as_tuple, crop_coords_top_left, ...)
    json                     {"image_shape": [H, W, C], "source": ...}: the image the moments encode

Batches hold the same names with a leading batch axis; `txt` is a [B] string array, `cls` [B] int32.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np

# the format's stored-output keys, named where the model reads them
from sgm_jax.batch_keys import EMBEDDING_PREFIX, MOMENTS_KEY, embedding_key, is_stored_output  # noqa: F401
from sgm_jax.errors import UserError
from sgm_jax.data.transforms import BadSample

_NPY = ".npy"


def is_preencoded(raw: dict) -> bool:
    """Whether a raw tar sample (extension -> bytes) is a pre-encoded one."""
    return MOMENTS_KEY + _NPY in raw


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(key: str, fields: dict[str, Any], image_shape: Sequence[int], source: str = "") -> dict:
    """One sample for webdataset.write_tar_shards: arrays become `<name>.npy`, "txt" text, "cls" an int."""
    sample: dict[str, Any] = {"__key__": key}
    for name, value in fields.items():
        if name == "txt":
            sample["txt"] = str(value)
        elif name == "cls":
            sample["cls"] = str(int(value))
        else:
            sample[name + _NPY] = npy_bytes(np.asarray(value))
    sample["json"] = json.dumps({"image_shape": [int(s) for s in image_shape], "source": source})
    return sample


def image_shape(raw: dict) -> tuple[int, int, int]:
    """(H, W, C) of the image a pre-encoded raw sample encodes."""
    meta = raw.get("json")
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta or {}
    if "image_shape" not in meta:
        raise UserError(f"pre-encoded sample {raw.get('__key__')} in {raw.get('__url__', '?')} has no image_shape "
                        "in its .json: write the shards again with python -m sgm_jax.cli.preencode")
    return tuple(int(s) for s in meta["image_shape"])  # type: ignore[return-value]


def decode_sample(raw: dict, required: Sequence[str]) -> dict:
    """Raw pre-encoded sample -> {name: array, "txt": str, "cls": int, "__image_shape__": (H, W, C)}.

    One UserError line for shards that are not pre-encoded; a missing required caption or label
    raises BadSample("missing_<key>") as for raw shards.
    """

    if not is_preencoded(raw):
        raise UserError(f"sample {raw.get('__key__')} in {raw.get('__url__', 'the data')} has no {MOMENTS_KEY}{_NPY}: "
                        "datapipeline.preencoded=True reads the shards of python -m sgm_jax.cli.preencode; "
                        "set it to False for raw image shards")
    out: dict[str, Any] = {"__image_shape__": image_shape(raw)}
    for ext, data in raw.items():
        if ext.endswith(_NPY):
            out[ext[: -len(_NPY)]] = np.load(io.BytesIO(data), allow_pickle=False)
        elif ext == "txt":
            out["txt"] = data.decode("utf-8", "replace").strip() if isinstance(data, bytes) else str(data)
        elif ext == "cls":
            out["cls"] = int(data.decode() if isinstance(data, bytes) else data)
    for key in required:
        if key not in ("jpg", *out):
            raise BadSample(f"missing_{key}", f"no {key!r} in pre-encoded sample {raw.get('__key__')}")
    return out


def collate(samples: list[dict]) -> dict[str, np.ndarray]:
    """Decoded pre-encoded samples (same fields, same shapes) -> a batch with a leading axis."""
    batch: dict[str, np.ndarray] = {}
    for key in samples[0]:
        if key.startswith("__"):
            continue
        values = [s[key] for s in samples]
        if key == "txt":
            batch[key] = np.asarray(values)
        elif key == "cls":
            batch[key] = np.asarray(values, np.int32)
        else:
            batch[key] = np.stack(values)
    return batch
