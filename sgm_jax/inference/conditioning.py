"""Conditioning for sampling: a jitted prompt encoder over the seed's value dict and get_batch
(sgm_jax.model_inputs).

The seed's demo (scripts/demo/streamlit_helpers.py) builds a `value_dict` (prompt, negative
prompt, original / target size, crop, aesthetic scores), turns it into a conditional
`batch` and an unconditional `batch_uc` per embedder input key, and calls
`conditioner.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings)`.
Here the same happens with the text tokenised on the host and the conditioner jitted on
its own, so a new prompt re-runs only the text towers (no UNet recompilation), and every
image of a request shares one conditioning row (batch 1, broadcast later).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax

from sgm_jax.model_inputs import TEXT_KEY, ConditioningValues, embedder_input_keys, get_batch
from sgm_jax.nn.conditioner import GeneralConditioner, get_unconditional_conditioning, text_tokenizers, tokenize_batch

Cond = dict[str, jax.Array]


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
