"""Which parameter a LoRA module name refers to, in every naming community files use.

A LoRA file names *modules* (a Linear or Conv), never our Flax paths. This module lists,
for a params tree (the engine's `{"model", "conditioner", ...}` or a bare UNet's), every
adaptable kernel under each name it is known by, normalised to `component:name_with_underscores`
(kohya writes `.` as `_`, so every name is compared in that form):

  unet:input_blocks_4_1_transformer_blocks_0_attn1_to_k     the seed's (SGM / LDM) module names:
                                                            kohya's SDXL files
  unet:down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k
                                                            diffusers' UNet2DConditionModel names:
                                                            diffusers / peft files, kohya's SD 1/2 files
  te1:text_model_encoder_layers_0_self_attn_q_proj          transformers' CLIPTextModel names for the
  te2:...                                                   first / second text tower

te1 / te2 are the text embedders in conditioner order (SDXL: CLIP-L, OpenCLIP-bigG; SD 2.x: its
one OpenCLIP-H tower is te1). LoRA tools see every tower through transformers' CLIPTextModel,
so for an OpenCLIP tower the names are translated: `q_proj` / `k_proj` / `v_proj` are the
three row blocks of the fused `attn.in_proj_weight` (a `Target` with `columns`), `out_proj`
is `attn.out_proj`, `mlp.fc1` / `fc2` are `mlp.c_fc` / `c_proj`.

The diffusers <-> seed UNet map (the one diffusers' `convert_ldm_unet_checkpoint` applies),
with n = num_res_blocks:
  input_blocks.0.0                 conv_in
  input_blocks.{1+l(n+1)+j}.0 / .1 down_blocks.{l}.resnets.{j} / attentions.{j}     (j < n)
  input_blocks.{(l+1)(n+1)}.0.op   down_blocks.{l}.downsamplers.0.conv
  middle_block.0 / .1 / .2         mid_block.resnets.0 / attentions.0 / resnets.1
  output_blocks.{l(n+1)+j}.0 / .1  up_blocks.{l}.resnets.{j} / attentions.{j}        (j <= n)
  output_blocks.{l(n+1)+n}.{1|2}.conv   up_blocks.{l}.upsamplers.0.conv
  time_embed.0 / .2, label_emb.0.0 / .0.2, out.0 / .2
                                   time_embedding.linear_1 / 2, add_embedding.linear_1 / 2,
                                   conv_norm_out / conv_out
  inside a ResBlock: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj,
                     out_layers.0 norm2, out_layers.3 conv2, skip_connection conv_shortcut
  inside a SpatialTransformer: the same names (norm, proj_in, transformer_blocks.k.attn1.to_q, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from sgm_jax.convert.common import FlaxPath, flatten_params
from sgm_jax.convert.text import text_key_map
from sgm_jax.convert.unet import flax_path_to_torch

COMPONENTS = ("unet", "te1", "te2")
_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP_NAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
_OPENCLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    """One adaptable kernel. path: the leaf's path in the params tree (ends in "kernel");
    kind: "linear" (Flax [in, out]) or "conv" (Flax [kh, kw, in, out]); columns: for a fused
    OpenCLIP in_proj, the output block (start, stop) this name owns, else None."""

    path: FlaxPath
    kind: str
    columns: tuple[int, int] | None = None

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The PyTorch weight shape a LoRA delta for this target must have."""
        if self.kind == "conv":
            kh, kw, cin, cout = flax_shape
            return (cout, cin, kh, kw)
        cin, cout = flax_shape
        return ((self.columns[1] - self.columns[0]) if self.columns else cout, cin)


def underscored(name: str) -> str:
    return name.replace(".", "_")


def unet_subtree(params: Mapping[str, Any]) -> tuple[FlaxPath, Mapping[str, Any] | None]:
    """(path, subtree) of the UNet in an engine params tree or a bare UNet params tree."""
    if "input_blocks_0" in params:
        return (), params
    model = params.get("model")
    if isinstance(model, Mapping) and "input_blocks_0" in model:
        return ("model",), model
    return (), None


def num_res_blocks(unet: Mapping[str, Any]) -> int | None:
    """The seed's num_res_blocks, read off the params tree: with n res blocks per level the
    downsampling `op` blocks are input blocks n+1, 2(n+1), ... None when the levels differ
    (a per-level num_res_blocks, which diffusers' UNet cannot express) or nothing tells."""
    blocks = sorted(int(k.rsplit("_", 1)[1]) for k in unet if k.startswith("input_blocks_"))
    ops = [i for i in blocks if "op" in unet[f"input_blocks_{i}"].get("0", {})]
    n = ops[0] - 1 if ops else len(blocks) - 1
    if n < 1 or ops != [k * (n + 1) for k in range(1, len(ops) + 1)] or len(blocks) != (len(ops) + 1) * (n + 1):
        return None
    return n


def seed_to_diffusers(module: str, n: int) -> str | None:
    """A seed UNet module name (`input_blocks.4.1.proj_in`) -> diffusers' name
    (`down_blocks.1.attentions.0.proj_in`); None for modules diffusers has no name for."""
    for seed, diffusers in _TOP_NAMES.items():
        if module == seed or module.startswith(seed + "."):
            return diffusers + module[len(seed):]
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d)\.(.+)", module)
    if m is None:
        return None
    if m.group(5) is not None:
        child, rest = int(m.group(5)), m.group(6)
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[child]
        return _inside(block, child != 1, rest)
    kind, index, child, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        level, j = divmod(index - 1, n + 1)
        if j == n:  # the level's downsampling block
            return f"down_blocks.{level}.downsamplers.0.conv" if (child, rest) == (0, "op") else None
        return _inside(f"down_blocks.{level}.{'resnets' if child == 0 else 'attentions'}.{j}", child == 0, rest)
    level, j = divmod(index, n + 1)
    if child > 0 and rest == "conv":  # the Upsample after the level's last block
        return f"up_blocks.{level}.upsamplers.0.conv"
    return _inside(f"up_blocks.{level}.{'resnets' if child == 0 else 'attentions'}.{j}", child == 0, rest)


def _inside(block: str, is_resnet: bool, rest: str) -> str | None:
    if not is_resnet:
        return f"{block}.{rest}"
    for seed, diffusers in _RESNET_NAMES.items():
        if rest == seed:
            return f"{block}.{diffusers}"
    return None


def _kernels(tree: Mapping[str, Any]) -> dict[FlaxPath, tuple[int, ...]]:
    return {p: tuple(v.shape) for p, v in flatten_params(tree).items() if p[-1] == "kernel"}


def _add(table: dict[str, Target], name: str, target: Target) -> None:
    if table.setdefault(name, target) != target:  # a naming bug, never the user's file
        raise AssertionError(f"LoRA name {name} maps to two parameters")


def unet_targets(params: Mapping[str, Any]) -> dict[str, Target]:
    """{"unet:<name>": Target} for every UNet Dense / Conv kernel, under its seed and its
    diffusers name."""
    base, unet = unet_subtree(params)
    if unet is None:
        return {}
    n = num_res_blocks(unet)
    table: dict[str, Target] = {}
    for path, shape in _kernels(unet).items():
        key, kind = flax_path_to_torch(path, len(shape))
        module = key[: -len(".weight")]
        target = Target(base + path, kind)
        _add(table, "unet:" + underscored(module), target)
        diffusers = seed_to_diffusers(module, n) if n is not None else None
        if diffusers is not None:
            _add(table, "unet:" + underscored(diffusers), target)
    return table


def text_towers(params: Mapping[str, Any]) -> list[tuple[FlaxPath, str, Mapping[str, Any]]]:
    """[(path of the tower, "clip" | "openclip", tower params)] in conditioner order."""
    conditioner = params.get("conditioner")
    if not isinstance(conditioner, Mapping):
        return []
    towers = []
    order = sorted((k for k in conditioner if k.startswith("embedders_")), key=lambda k: int(k.split("_")[1]))
    for name in order:
        sub = conditioner[name]
        if isinstance(sub.get("transformer"), Mapping) and "encoder" in sub["transformer"]:
            towers.append((("conditioner", name, "transformer"), "clip", sub["transformer"]))
        elif isinstance(sub.get("model"), Mapping) and "transformer" in sub["model"]:
            towers.append((("conditioner", name, "model"), "openclip", sub["model"]))
    return towers


def text_targets(params: Mapping[str, Any]) -> dict[str, Target]:
    """{"te1:<name>" / "te2:<name>": Target}, names as transformers' CLIPTextModel has them."""
    table: dict[str, Target] = {}
    for number, (base, family, tower) in enumerate(text_towers(params)[:2], start=1):
        keys = text_key_map(tower)
        for path, shape in _kernels(tower).items():
            key, kind = keys[path]
            if family == "clip":
                _add(table, f"te{number}:" + underscored("text_model." + key[: -len(".weight")]), Target(base + path, kind))
                continue
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+?)\.?(in_proj_weight|weight)", key)
            if m is None:
                continue  # text_projection and friends: no transformers Linear of that name
            layer = f"text_model.encoder.layers.{m.group(1)}."
            if m.group(3) == "in_proj_weight":
                width = shape[1] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    _add(table, f"te{number}:" + underscored(layer + "self_attn." + proj),
                         Target(base + path, kind, (i * width, (i + 1) * width)))
            elif m.group(2) in _OPENCLIP_TO_HF:
                _add(table, f"te{number}:" + underscored(layer + _OPENCLIP_TO_HF[m.group(2)]), Target(base + path, kind))
    return table


def lora_targets(params: Mapping[str, Any]) -> dict[str, Target]:
    """Every name a LoRA file may use for a kernel of `params` (engine or bare UNet tree,
    arrays or ShapeDtypeStructs) -> Target."""
    return {**unet_targets(params), **text_targets(params)}
