"""Text encoders: seed checkpoint keys <-> Flax params of the embedders in `sgm_jax.nn.text`.

- CLIP ViT-L/14 (`FrozenCLIPEmbedder`, params `{"transformer": ...}`): keys of transformers'
  CLIPTextModel under `conditioner.embedders.0.transformer.` (SDXL). Checkpoints written by
  transformers 4.x (every released SDXL file) nest them under `text_model.`; transformers 5
  does not. Both are read; export writes the `text_model.` layout real checkpoints use.
  The `position_ids` buffer is ignored.
- OpenCLIP text tower (`FrozenOpenCLIPEmbedder2` / `FrozenOpenCLIPEmbedder`, params
  `{"model": ...}`): keys under `conditioner.embedders.1.model.` (SDXL, ViT-bigG) or
  `cond_stage_model.model.` (SD 2.x, ViT-H); `attn.in_proj_weight` stays fused; the
  `logit_scale` and `attn_mask` entries are ignored.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.convert.common import FlaxPath, KeyMap, convert_state_dict, export_state_dict, flatten_params
from sgm_jax.convert.vae import torch_leaf

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."
OPENCLIP_H_PREFIX = "cond_stage_model.model."

_TEXT_MODEL = "text_model."
CLIP_IGNORED_SUFFIXES = ("position_ids",)  # transformers' arange buffer
OPENCLIP_IGNORED_SUFFIXES = ("logit_scale", "attn_mask")  # contrastive temperature, causal mask
_INDEXED = re.compile(r"^(layers|resblocks)_(\d+)$")  # "layers_3" -> "layers.3"


def _torch_key(path: FlaxPath, ndim: int) -> tuple[str, str]:
    leaf, kind = torch_leaf(path[-1], ndim)
    modules = [_INDEXED.sub(r"\1.\2", name) for name in path[:-1]]
    if modules and modules[-1] == "in_proj":  # nn.MultiheadAttention's fused in_proj_weight / _bias
        return ".".join(modules[:-1] + [f"in_proj_{leaf}"]), kind
    return ".".join(modules + [leaf]), kind


def text_key_map(params: Mapping[str, Any]) -> KeyMap:
    """{Flax path: (torch key relative to the tower, kind)} for a CLIPTextTransformer or an
    OpenCLIPTextTower params tree (arrays or ShapeDtypeStructs)."""
    return {path: _torch_key(path, len(v.shape)) for path, v in flatten_params(params).items()}


def abstract_embedder_params(embedder: nn.Module) -> Mapping[str, Any]:
    """An embedder's params tree as ShapeDtypeStructs (shapes only, nothing computed)."""
    tokens = jax.ShapeDtypeStruct((1, embedder.max_length), jnp.int32)
    return jax.eval_shape(lambda t: embedder.init(jax.random.key(0), t), tokens)["params"]


def clip_text_prefix(keys: Collection[str] | None, prefix: str) -> str:
    """Where a CLIP text model's parameters sit: `prefix + "text_model."` (transformers 4.x,
    every released SDXL file) or `prefix` (transformers 5). Decided by a real parameter
    (any key under the prefix other than the `position_ids` buffer), so a stray buffer does
    not choose the layout. Without keys, or with no parameter under either, the released
    layout (nested)."""
    nested = prefix + _TEXT_MODEL
    if keys is None:
        return nested
    has_param = lambda p: any(k.startswith(p) and not k.endswith(CLIP_IGNORED_SUFFIXES) for k in keys)
    if not has_param(nested) and has_param(prefix):
        return prefix
    return nested


def convert_clip_l(
    state_dict: Mapping[str, Any],
    embedder: nn.Module,
    *,
    prefix: str = CLIP_L_PREFIX,
    dtype: Any = None,
) -> dict[str, Any]:
    """Seed-layout CLIP text-model weights -> `{"transformer": ...}` params for `embedder`
    (a FrozenCLIPEmbedder). Raises CheckpointMismatchError on missing / unexpected /
    mis-shaped keys."""
    abstract = abstract_embedder_params(embedder)["transformer"]
    tower = convert_state_dict(
        state_dict, text_key_map(abstract), abstract,
        prefix=clip_text_prefix(state_dict.keys(), prefix), ignore_unexpected=CLIP_IGNORED_SUFFIXES, dtype=dtype,
    )
    return {"transformer": tower}


def export_clip_l(params: Mapping[str, Any], *, prefix: str = CLIP_L_PREFIX, text_model: bool = True) -> dict[str, Any]:
    """`{"transformer": ...}` params -> seed-layout state dict (numpy, torch layouts);
    `text_model=True` nests keys under `text_model.` as released SDXL checkpoints do."""
    tower = params["transformer"]
    full_prefix = prefix + (_TEXT_MODEL if text_model else "")
    return export_state_dict(tower, text_key_map(tower), prefix=full_prefix)


def convert_openclip(
    state_dict: Mapping[str, Any],
    embedder: nn.Module,
    *,
    prefix: str = OPENCLIP_G_PREFIX,
    dtype: Any = None,
) -> dict[str, Any]:
    """Seed-layout OpenCLIP text-tower weights -> `{"model": ...}` params for `embedder`
    (FrozenOpenCLIPEmbedder2 with OPENCLIP_G_PREFIX, FrozenOpenCLIPEmbedder with
    OPENCLIP_H_PREFIX). Raises CheckpointMismatchError on missing / unexpected /
    mis-shaped keys."""
    abstract = abstract_embedder_params(embedder)["model"]
    tower = convert_state_dict(
        state_dict, text_key_map(abstract), abstract, prefix=prefix, ignore_unexpected=OPENCLIP_IGNORED_SUFFIXES, dtype=dtype
    )
    return {"model": tower}


def export_openclip(params: Mapping[str, Any], *, prefix: str = OPENCLIP_G_PREFIX) -> dict[str, Any]:
    """`{"model": ...}` params -> seed-layout state dict (numpy, torch layouts)."""
    tower = params["model"]
    return export_state_dict(tower, text_key_map(tower), prefix=prefix)
