"""CLIP checkpoints -> Flax params for the CLIP score: the image tower
(`sgm_jax.evaluation.clip_image.CLIPVisionTower`, openai / open_clip layout) and the text tower
with its projection (`sgm_jax.nn.text.CLIPTextTransformer` + `text_projection`).

Two checkpoint layouts are read:
  * openai / open_clip: `visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`,
    ..., `visual.proj` (OpenAI's `ViT-L-14.pt`, open_clip's `open_clip_pytorch_model.bin`):
    the image tower maps one to one;
  * transformers' CLIPModel / CLIPVisionModelWithProjection (`openai/clip-vit-large-patch14`,
    what torchmetrics' CLIPScore loads): `vision_model.*` + `visual_projection.weight`, viewed
    in the openai layout by `HFVisionAsOpenAI` (q/k/v stacked into in_proj on access), and
    `text_model.*` + `text_projection.weight` for the text side.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from sgm_jax.convert.common import CheckpointMismatchError, convert_state_dict, to_flax_layout
from sgm_jax.convert.text import text_key_map

OPENAI_PREFIX = "visual."
HF_VISION_PREFIX = "vision_model."
HF_REPO = "openai/clip-vit-large-patch14"
ENV_VAR = "SGM_JAX_CLIP_WEIGHTS"
_HF_IGNORED = ("position_ids",)

# openai module path (after `transformer.resblocks.N.` for blocks) -> transformers' name.
_HF_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
_HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


class HFVisionAsOpenAI(Mapping[str, np.ndarray]):
    """A transformers-layout CLIP state dict seen as openai `visual.*` keys (lazy).

    `in_proj_weight` / `in_proj_bias` are [q; k; v] stacked; `proj` is
    `visual_projection.weight` transposed ([width, embed_dim], used as x @ proj).
    """

    def __init__(self, state_dict: Mapping[str, Any], prefix: str = HF_VISION_PREFIX):
        self._sd, self._prefix = state_dict, prefix
        layers = {int(m.group(1)) for k in state_dict if k.startswith(prefix)
                  and (m := _HF_LAYER.match(k[len(prefix):]))}
        keys = [OPENAI_PREFIX + k for k in _HF_TOP] + [OPENAI_PREFIX + "proj"]
        for i in sorted(layers):
            block = f"{OPENAI_PREFIX}transformer.resblocks.{i}."
            keys += [block + f"{name}.{leaf}" for name in _HF_BLOCK for leaf in ("weight", "bias")]
            keys += [block + "attn.in_proj_weight", block + "attn.in_proj_bias"]
        self._keys = tuple(keys)

    def _source(self, key: str) -> list[str] | str:
        """The transformers key(s) behind an openai key (a list: stacked in_proj)."""
        key = key[len(OPENAI_PREFIX):]
        if key == "proj":
            return "visual_projection.weight"
        if key in _HF_TOP:
            return self._prefix + _HF_TOP[key]
        m = _BLOCK_KEY.match(key) or re.match(r"^transformer\.resblocks\.(\d+)\.(attn)\.in_proj_(weight|bias)$", key)
        i, module, leaf = m.groups()
        layer = f"{self._prefix}encoder.layers.{i}."
        if module == "attn":
            return [f"{layer}self_attn.{p}_proj.{leaf}" for p in ("q", "k", "v")]
        return f"{layer}{_HF_BLOCK[module]}.{leaf}"

    def unused_keys(self) -> list[str]:
        """Image-tower keys of the underlying state dict that no openai key reads (buffers such
        as `position_ids` excepted): a layout this view does not know."""
        used = set()
        for key in self._keys:
            source = self._source(key)
            used.update(source if isinstance(source, list) else [source])
        return sorted(k for k in self._sd if (k.startswith(self._prefix) or k.startswith("visual_projection."))
                      and k not in used and not k.endswith(_HF_IGNORED))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        source = self._source(key)
        if isinstance(source, list):
            return np.concatenate([np.asarray(self._sd[s]) for s in source], axis=0)
        value = np.asarray(self._sd[source])
        return value.T if key == OPENAI_PREFIX + "proj" else value

    def shape_of(self, key: str) -> tuple[int, ...]:
        source = self._source(key)
        shape_of = getattr(self._sd, "shape_of", lambda k: np.shape(self._sd[k]))
        if isinstance(source, list):
            shapes = [tuple(shape_of(s)) for s in source]
            return (sum(s[0] for s in shapes),) + shapes[0][1:]
        shape = tuple(shape_of(source))
        return shape[::-1] if key == OPENAI_PREFIX + "proj" else shape

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def openai_view(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict in the openai `visual.*` layout, whichever layout it is stored in."""
    if any(k.startswith(OPENAI_PREFIX) for k in state_dict):
        return state_dict
    if any(k.startswith(HF_VISION_PREFIX) for k in state_dict):
        return HFVisionAsOpenAI(state_dict)
    raise ValueError("not a CLIP checkpoint with an image tower: no 'visual.*' (openai / open_clip) or "
                     "'vision_model.*' (transformers) keys")


def convert_clip_vision(state_dict: Mapping[str, Any], tower: Any) -> dict[str, Any]:
    """openai / open_clip or transformers CLIP weights -> CLIPVisionTower params (float32).
    Raises CheckpointMismatchError listing missing / unexpected / mis-shaped keys."""
    from sgm_jax.evaluation.clip_image import abstract_vision_params

    abstract = abstract_vision_params(tower)
    view = openai_view(state_dict)
    unused = view.unused_keys() if isinstance(view, HFVisionAsOpenAI) else []
    if unused:
        raise CheckpointMismatchError(f"unexpected image-tower keys ({len(unused)}): {', '.join(unused[:10])}")
    return convert_state_dict(view, text_key_map(abstract), abstract, prefix=OPENAI_PREFIX, dtype="float32")


def convert_clip_text(state_dict: Mapping[str, Any], text_model: Any) -> dict[str, Any]:
    """transformers CLIPModel weights (`text_model.*`, `text_projection.weight`) ->
    `{"transformer": CLIPTextTransformer params, "text_projection": [W, E]}` (float32)."""
    import jax
    import jax.numpy as jnp

    tokens = jax.ShapeDtypeStruct((1, text_model.max_length), jnp.int32)
    abstract = jax.eval_shape(lambda t: text_model.init(jax.random.key(0), t), tokens)["params"]
    if "text_projection.weight" not in state_dict:
        raise ValueError("no 'text_projection.weight' in the CLIP checkpoint: the CLIP score needs transformers' "
                         f"CLIPModel weights ({HF_REPO}), text and image towers")
    tower = convert_state_dict(state_dict, text_key_map(abstract), abstract, prefix="text_model.",
                               ignore_unexpected=_HF_IGNORED, dtype="float32")
    projection = to_flax_layout("linear", np.asarray(state_dict["text_projection.weight"], np.float32))
    return {"transformer": tower, "text_projection": projection}


def default_weight_paths() -> list[Path]:
    """$SGM_JAX_CLIP_WEIGHTS, then transformers' cache of openai/clip-vit-large-patch14."""
    paths = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    snapshots = hf_home / "hub" / f"models--{HF_REPO.replace('/', '--')}" / "snapshots"
    paths += sorted(snapshots.glob("*/model.safetensors")) if snapshots.is_dir() else []
    paths.append(Path("~/.cache/sgm_jax/clip-vit-large-patch14.safetensors").expanduser())
    return paths


def open_clip_checkpoint(path: str | os.PathLike | None = None) -> Mapping[str, Any]:
    """The CLIP ViT-L/14 checkpoint (a file, or a transformers folder holding model.safetensors);
    FileNotFoundError with one line saying which file to put where when absent."""
    from sgm_jax.convert.files import open_checkpoint

    if path is not None and Path(path).is_dir():
        path = Path(path) / "model.safetensors"
    candidates = [Path(path)] if path is not None else default_weight_paths()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"CLIP ViT-L/14 weights not found: put model.safetensors of {HF_REPO} (transformers' CLIPModel) at "
            f"{candidates[-1]} or point ${ENV_VAR} at it (or at OpenAI's ViT-L-14.pt)")
    return open_checkpoint(found, allow_pickle=found.suffix != ".safetensors")
