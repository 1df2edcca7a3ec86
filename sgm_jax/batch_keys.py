"""Batch keys with a meaning of their own: SDXL's size and crop pairs, and the keys that stand for a
computation already done (the first stage's encoder moments and the frozen embedders' outputs).
Pre-encoded shards (sgm_jax.data.preencoded) store the latter; the engine and the conditioner take
them in place of images and raw inputs.
"""

from __future__ import annotations

# SDXL's micro-conditioning: [B, 2] (height, width) / (top, left) pairs, in pixels
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
MOMENTS_KEY = "first_stage_moments"  # [B, h, w, 2 * embed_dim]: mean and logvar of the posterior
EMBEDDING_PREFIX = "embedding_"


def embedding_key(index: int, output: int) -> str:
    """Batch key of output `output` of embedder `index`, [B, ...]."""
    return f"{EMBEDDING_PREFIX}{index}_{output}"


def is_stored_output(key: str) -> bool:
    """True for the keys that replace a computation (moments, frozen embeddings), not an input."""
    return key == MOMENTS_KEY or key.startswith(EMBEDDING_PREFIX)
