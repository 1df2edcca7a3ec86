"""CLIP checkpoints -> Flax params for the CLIP score: the image tower
(`sgm_jax.nn.clip_vision.CLIPVisionTower`, openai / open_clip layout) and the text tower
with its projection (`sgm_jax.nn.text.CLIPTextTransformer` + `text_projection`).

Two checkpoint layouts are read:
  * openai / open_clip: `visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`,
    ..., `visual.proj` (open_clip's `open_clip_pytorch_model.bin`, OpenAI's weights as a state
    dict; OpenAI's own `ViT-L-14.pt` is a TorchScript archive: save its `state_dict()` first):
    the image tower maps one to one;
  * transformers' CLIPModel / CLIPVisionModelWithProjection (`openai/clip-vit-large-patch14`,
    what torchmetrics' CLIPScore loads): `vision_model.*` + `visual_projection.weight`, viewed
    in the openai layout by `hf_vision_as_openai` (q/k/v stacked into in_proj on access), and
    `text_model.*` + `text_projection.weight` for the text side (the text tower is
    transformers' CLIPTextModel here; open_clip text keys are viewed in that layout by
    `openai_text_as_hf`, in_proj split into q/k/v).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from sgm_jax.convert.common import CheckpointMismatchError, convert_state_dict, to_flax_layout
from sgm_jax.convert.text import text_key_map
from sgm_jax.nn.clip_vision import abstract_vision_params
from sgm_jax.convert.files import open_checkpoint

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
_HF_TEXT_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_OPENAI_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")

# A plan: {key of the view: (op, source keys)}; op "copy" / "transpose" one source, "stack" the
# sources on axis 0 (q, k, v -> in_proj), ("part", i, n) the i-th of n equal row blocks of one source.
Plan = dict[str, tuple[Any, list[str]]]


class RenamedView(Mapping[str, np.ndarray]):
    """A state dict seen through a plan (lazy: each tensor is read and rearranged on access)."""
    def __init__(self, state_dict: Mapping[str, Any], plan: Plan, own_prefixes: tuple[str, ...]):
        self._sd, self._plan, self._own = state_dict, plan, own_prefixes

    def __getitem__(self, key: str) -> np.ndarray:
        op, sources = self._plan[key]
        arrays = [np.asarray(self._sd[s]) for s in sources]
        if op == "stack":
            return np.concatenate(arrays, axis=0)
        if op == "transpose":
            return arrays[0].T
        if isinstance(op, tuple):  # ("part", i, n)
            rows = arrays[0].shape[0] // op[2]
            return arrays[0][op[1] * rows:(op[1] + 1) * rows]
        return arrays[0]

    def shape_of(self, key: str) -> tuple[int, ...]:
        op, sources = self._plan[key]
        read = getattr(self._sd, "shape_of", lambda k: np.shape(self._sd[k]))
        shapes = [tuple(int(d) for d in read(s)) for s in sources]
        if op == "stack":
            return (sum(s[0] for s in shapes),) + shapes[0][1:]
        if op == "transpose":
            return shapes[0][::-1]
        if isinstance(op, tuple):
            return (shapes[0][0] // op[2],) + shapes[0][1:]
        return shapes[0]

    def unused_keys(self) -> list[str]:
        """Keys of the underlying state dict under this view's prefixes that no view key reads
        (buffers such as `position_ids` excepted): a layout the plan does not know."""
        used = {s for _, sources in self._plan.values() for s in sources}
        return sorted(k for k in self._sd if k.startswith(self._own) and k not in used and not k.endswith(_HF_IGNORED))

    def __contains__(self, key: object) -> bool:
        return key in self._plan

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def _block_plan(layers: set[int], to_block: Any, from_block: Any, fused: bool) -> Plan:
    """Per-block entries; `to_block(i)` / `from_block(i)` give the two layouts' block prefixes;
    fused: the view is openai (stack q, k, v), else transformers (split in_proj)."""
    plan: Plan = {}
    for i in sorted(layers):
        src, dst = from_block(i), to_block(i)
        for openai_name, hf_name in _HF_BLOCK.items():
            for leaf in ("weight", "bias"):
                a, b = f"{openai_name}.{leaf}", f"{hf_name}.{leaf}"
                plan[dst + (a if fused else b)] = ("copy", [src + (b if fused else a)])
        for leaf in ("weight", "bias"):
            if fused:
                plan[f"{dst}attn.in_proj_{leaf}"] = ("stack", [f"{src}self_attn.{p}_proj.{leaf}" for p in "qkv"])
            else:
                for j, p in enumerate("qkv"):
                    plan[f"{dst}self_attn.{p}_proj.{leaf}"] = (("part", j, 3), [f"{src}attn.in_proj_{leaf}"])
    return plan


def hf_vision_as_openai(state_dict: Mapping[str, Any], prefix: str = HF_VISION_PREFIX) -> RenamedView:
    """transformers' `vision_model.*` + `visual_projection.weight` seen as openai `visual.*` keys:
    q / k / v stacked into `in_proj`, `proj` = visual_projection.weight transposed ([W, E], x @ proj)."""
    layers = {int(m.group(1)) for k in state_dict if k.startswith(prefix) and (m := _HF_LAYER.match(k[len(prefix):]))}
    plan: Plan = {OPENAI_PREFIX + k: ("copy", [prefix + v]) for k, v in _HF_TOP.items()}
    plan[OPENAI_PREFIX + "proj"] = ("transpose", ["visual_projection.weight"])
    plan.update(_block_plan(layers, lambda i: f"{OPENAI_PREFIX}transformer.resblocks.{i}.",
                            lambda i: f"{prefix}encoder.layers.{i}.", fused=True))
    return RenamedView(state_dict, plan, (prefix, "visual_projection."))


def openai_text_as_hf(state_dict: Mapping[str, Any]) -> RenamedView:
    """OpenAI / open_clip text-tower keys (`token_embedding.weight`, `transformer.resblocks.N.*`,
    `ln_final`, `text_projection` [W, E]) seen as transformers' `text_model.*` + `text_projection.weight`."""
    layers = {int(m.group(1)) for k in state_dict if (m := _OPENAI_BLOCK.match(k))}
    plan: Plan = {"text_model." + v: ("copy", [k]) for k, v in _HF_TEXT_TOP.items()}
    plan["text_projection.weight"] = ("transpose", ["text_projection"])
    plan.update(_block_plan(layers, lambda i: f"text_model.encoder.layers.{i}.",
                            lambda i: f"transformer.resblocks.{i}.", fused=False))
    return RenamedView(state_dict, plan, ("transformer.", "token_embedding.", "ln_final."))


def openai_view(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict in the openai `visual.*` layout, whichever layout it is stored in."""
    if any(k.startswith(OPENAI_PREFIX) for k in state_dict):
        return state_dict
    if any(k.startswith(HF_VISION_PREFIX) for k in state_dict):
        return hf_vision_as_openai(state_dict)
    raise ValueError("not a CLIP checkpoint with an image tower: no 'visual.*' (openai / open_clip) or "
                     "'vision_model.*' (transformers) keys")


def convert_clip_vision(state_dict: Mapping[str, Any], tower: Any) -> dict[str, Any]:
    """openai / open_clip or transformers CLIP weights -> CLIPVisionTower params (float32).
    Raises CheckpointMismatchError listing missing / unexpected / mis-shaped keys."""
    abstract = abstract_vision_params(tower)
    view = openai_view(state_dict)
    unused = view.unused_keys() if isinstance(view, RenamedView) else []
    if unused:
        raise CheckpointMismatchError(f"unexpected image-tower keys ({len(unused)}): {', '.join(unused[:10])}")
    return convert_state_dict(view, text_key_map(abstract), abstract, prefix=OPENAI_PREFIX, dtype="float32")


def convert_clip_text(state_dict: Mapping[str, Any], text_model: Any) -> dict[str, Any]:
    """CLIP text tower with its projection -> `{"transformer": CLIPTextTransformer params,
    "text_projection": [W, E]}` (float32), from transformers' CLIPModel keys (`text_model.*`,
    `text_projection.weight`) or the openai / open_clip ones (`token_embedding.weight`, ...)."""
    import jax
    import jax.numpy as jnp

    if "text_model.final_layer_norm.weight" not in state_dict and "token_embedding.weight" in state_dict:
        state_dict = openai_text_as_hf(state_dict)
        if state_dict.unused_keys():
            raise CheckpointMismatchError(f"unexpected text-tower keys: {', '.join(state_dict.unused_keys()[:10])}")
    if "text_projection.weight" not in state_dict:
        raise ValueError("no text projection in the CLIP checkpoint: the CLIP score needs both CLIP towers "
                         f"(transformers' CLIPModel weights of {HF_REPO}, or open_clip's)")
    tokens = jax.ShapeDtypeStruct((1, text_model.max_length), jnp.int32)
    abstract = jax.eval_shape(lambda t: text_model.init(jax.random.key(0), t), tokens)["params"]
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

    if path is not None and Path(path).is_dir():
        path = Path(path) / "model.safetensors"
    candidates = [Path(path)] if path is not None else default_weight_paths()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"CLIP ViT-L/14 weights not found: put model.safetensors of {HF_REPO} (transformers' CLIPModel) at "
            f"{candidates[-1]} or point ${ENV_VAR} at it (or at OpenAI's ViT-L-14.pt)")
    return open_checkpoint(found, allow_pickle=found.suffix != ".safetensors")
