"""Conditioning for sampling: the seed's value dict and get_batch, and a jitted prompt encoder.

The seed's demo (scripts/demo/streamlit_helpers.py) builds a `value_dict` (prompt, negative
prompt, original / target size, crop, aesthetic scores), turns it into a conditional
`batch` and an unconditional `batch_uc` per embedder input key, and calls
`conditioner.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings)`.
Here the same happens with the text tokenised on the host and the conditioner jitted on
its own, so a new prompt re-runs only the text towers (no UNet recompilation), and every
image of a request shares one conditioning row (batch 1, broadcast later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from sgm_jax.nn.conditioner import (
    GeneralConditioner,
    get_unconditional_conditioning,
    text_tokenizers,
    tokenize_batch,
)

Cond = dict[str, jax.Array]
TEXT_KEY = "txt"
# input keys the seed's get_batch knows (image-model keys such as fps / pool_image are not
# used by the text-to-image models)
SUPPORTED_KEYS = (TEXT_KEY, "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple",
                  "aesthetic_score")


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


class PromptEncoder:
    """(prompt, negative prompt, sizes) -> (c, uc), each a dict of batch-1 arrays.

    c/uc: "crossattn" [1, T, D] and/or "vector" [1, D_adm] (and "concat" if a model has one).
    Text is tokenised on the host; the conditioner runs in its own jit, compiled once per
    `zero_uc_keys` choice (the text shapes are fixed), never touching the sampling loop.
    """

    def __init__(self, conditioner: GeneralConditioner, clip_tokenizer: Any = None,
                 tokenizers: Mapping[int, Callable] | None = None) -> None:
        self.conditioner = conditioner
        self.keys = embedder_input_keys(conditioner)
        has_text = any(s.is_text for s in conditioner.specs if s.input_key)
        # tokenizers only when a text embedder exists: class-conditional models need none
        self.tokenizers = tokenizers if tokenizers is not None or not has_text else \
            text_tokenizers(conditioner, clip_tokenizer)
        self._jitted: dict[tuple[str, ...], Callable] = {}

    @property
    def has_text(self) -> bool:
        return TEXT_KEY in self.keys

    def _encode_fn(self, zero_uc_keys: tuple[str, ...]) -> Callable:
        if zero_uc_keys not in self._jitted:
            def encode(cond_params, batch, batch_uc):
                return get_unconditional_conditioning(self.conditioner, cond_params, batch, batch_uc,
                                                      force_uc_zero_embeddings=zero_uc_keys)

            self._jitted[zero_uc_keys] = jax.jit(encode)
        return self._jitted[zero_uc_keys]

    def tokenized(self, values: ConditioningValues) -> tuple[dict[str, Any], dict[str, Any]]:
        """Host-side batch and batch_uc (one row each) with text replaced by int32 tokens."""
        batch, batch_uc = get_batch(self.keys, values, 1)
        if self.has_text:
            batch = tokenize_batch(self.conditioner, batch, self.tokenizers)
            batch_uc = tokenize_batch(self.conditioner, batch_uc, self.tokenizers)
        return batch, batch_uc

    def __call__(self, cond_params: Any, values: ConditioningValues,
                 zero_uc_keys: Sequence[str] = ()) -> tuple[Cond, Cond]:
        """zero_uc_keys: input keys whose uc embeddings are zeros (seed: force_uc_zero_embeddings)."""
        batch, batch_uc = self.tokenized(values)
        return self._encode_fn(tuple(zero_uc_keys))(cond_params, batch, batch_uc)
