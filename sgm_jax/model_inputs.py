"""The inputs a model's conditioner reads, built in one place for every batch: example shapes
(initialisation, restore checks), training sample grids and sampling (the seed's value dict and
get_batch), SDXL's size and crop pairs included.

The seed's demo (scripts/demo/streamlit_helpers.py) builds a `value_dict` (prompt, negative
prompt, original / target size, crop, aesthetic scores) and turns it into a conditional `batch`
and an unconditional `batch_uc` per embedder input key; `get_batch` here is that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sgm_jax.batch_keys import SIZE_KEYS
from sgm_jax.engine import DiffusionEngine
from sgm_jax.nn.conditioner import GeneralConditioner, token_key, ucg_token_key

TEXT_KEY = "txt"
CLASS_KEY = "cls"
# input keys the seed's get_batch knows (image-model keys such as fps / pool_image are not
# used by the text-to-image models)
SUPPORTED_KEYS = (TEXT_KEY, CLASS_KEY, *SIZE_KEYS, "aesthetic_score")


@dataclass(frozen=True)
class ConditioningValues:
    """The seed's value_dict. Sizes are pixels; SDXL conditions on (height, width) pairs."""

    prompt: str
    negative_prompt: str = ""
    orig_width: int = 1024
    orig_height: int = 1024
    target_width: int = 1024
    target_height: int = 1024
    crop_coords_top: int = 0
    crop_coords_left: int = 0
    aesthetic_score: float = 6.0            # the refiner's defaults in the seed's demo
    negative_aesthetic_score: float = 2.5
    class_label: int = 0                    # a class-conditional model's "cls" (uc: the same id, zeroed)

    @classmethod
    def for_size(cls, prompt: str, negative_prompt: str, width: int, height: int, **kw: Any) -> "ConditioningValues":
        """init_dict of the seed's run_txt2img / apply_refiner: original = target = output size."""
        return cls(prompt, negative_prompt, orig_width=width, orig_height=height, target_width=width,
                   target_height=height, **kw)


def embedder_input_keys(conditioner: GeneralConditioner) -> list[str]:
    """Unique input keys of the conditioner's embedders, in embedder order."""
    keys: list[str] = []
    for spec in conditioner.specs:
        for k in (spec.input_key,) if spec.input_key else tuple(spec.input_keys or ()):
            if k not in keys:
                keys.append(k)
    return keys


def get_batch(keys: Sequence[str], values: ConditioningValues, n: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """(batch, batch_uc) with `n` rows, as the seed's get_batch (host side, numpy / strings).

    Size-like inputs are float32 [n, 2] ((height, width), (top, left)); the seed builds int
    tensors that its Fourier embedder converts to float, so the values are identical.
    Inputs without an unconditional value (sizes, crops) are copied into batch_uc.
    """
    batch: dict[str, Any] = {}
    batch_uc: dict[str, Any] = {}
    v = values

    def rows(*xs: float) -> np.ndarray:
        return np.tile(np.asarray([xs], np.float32), (n, 1))

    for key in keys:
        if key == TEXT_KEY:
            batch[key], batch_uc[key] = [v.prompt] * n, [v.negative_prompt] * n
        elif key == CLASS_KEY:
            batch[key] = np.full((n,), v.class_label, np.int32)
        elif key == "original_size_as_tuple":
            batch[key] = rows(v.orig_height, v.orig_width)
        elif key == "crop_coords_top_left":
            batch[key] = rows(v.crop_coords_top, v.crop_coords_left)
        elif key == "target_size_as_tuple":
            batch[key] = rows(v.target_height, v.target_width)
        elif key == "aesthetic_score":
            batch[key], batch_uc[key] = rows(v.aesthetic_score), rows(v.negative_aesthetic_score)
        else:
            raise ValueError(f"conditioning input {key!r} is not supported for sampling; "
                             f"supported: {', '.join(SUPPORTED_KEYS)}")
    for key, value in batch.items():
        if key not in batch_uc:
            batch_uc[key] = value.copy() if isinstance(value, np.ndarray) else value
    return batch, batch_uc


def example_batch(engine: DiffusionEngine, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """A 1-example batch with the inputs the conditioner reads (class labels, text tokens as
    tokenize_batch leaves them, size / crop pairs): shapes for initialisation, no tokenizer needed."""
    batch: dict[str, Any] = {engine.input_key: np.zeros((1,) + tuple(image_shape), np.float32)}
    for i, spec in enumerate(engine.conditioner.specs):
        if spec.is_text:
            tokens = np.zeros((1, int(spec.params.get("max_length", 77))), np.int32)
            batch[token_key(spec.input_key, i)] = tokens
            if spec.legacy_ucg_value is not None:  # training replaces dropped captions by these tokens
                batch[ucg_token_key(spec.input_key, i)] = tokens
        elif spec.input_key == CLASS_KEY:
            batch["cls"] = np.zeros((1,), np.int32)
        elif spec.input_key is not None:
            batch[spec.input_key] = np.zeros((1, 2), np.int32)
    return batch
