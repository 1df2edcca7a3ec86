"""AutoencoderKL: seed checkpoint keys (`first_stage_model.encoder.down.0.block.0.conv1.weight`,
...) <-> Flax params of `sgm_jax.nn.vae.AutoencoderKL`.

The key map is derived from the Flax params tree itself: module names in `sgm_jax.nn.vae`
are the seed's with list indices written `down_1_block_0`, so every Flax path translates
mechanically, and `convert_state_dict` checks that the map covers the model exactly.
The video decoder (`sgm_jax.nn.video_vae`, SVD) adds modules named as the seed's openaimodel
ones (`time_stack/in_layers_2` -> `time_stack.in_layers.2`, `to_out_0` -> `to_out.0`), its
Conv3d kernels (5-d, "conv") and the blocks' `mix_factor` ("copy"; a buffer in the seed under
merge_strategy "fixed", accepted and left out on conversion).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sgm_jax.convert.common import FlaxPath, KeyMap, convert_state_dict, export_state_dict, flatten_params
from sgm_jax.nn.vae import AutoencoderKL, normalize_ddconfig

VAE_PREFIX = "first_stage_model."

# "down_1_block_0" -> "down.1.block.0", "up_2_upsample" -> "up.2.upsample",
# "mid_attn_1" -> "mid.attn_1" (the seed's mid blocks are attributes, not list entries).
_LEVEL = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")
_MID = re.compile(r"^mid_(block_1|attn_1|block_2)$")
# Any other `<name>_<index>`: a torch list / Sequential entry (the video decoder's openaimodel
# and attention modules); no image Encoder / Decoder name ends so.
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def torch_leaf(leaf: str, ndim: int) -> tuple[str, str]:
    """Flax leaf name and rank -> (torch leaf name, transform kind).

    Dense/Conv `kernel` -> `weight` (linear / conv layout: Conv2d and Conv3d), norm `scale` -> `weight`,
    `embedding` -> `weight`, `bias` and raw parameters (e.g. `positional_embedding`) as is.
    """
    if leaf == "kernel":
        return "weight", "conv" if ndim >= 4 else "linear"
    if leaf in ("scale", "embedding"):
        return "weight", "copy"
    return leaf, "copy"


def _torch_module(name: str) -> str:
    if m := _MID.match(name):
        return f"mid.{m.group(1)}"
    if m := _LEVEL.match(name) or _RESAMPLE.match(name):
        return ".".join(m.groups())
    return _INDEXED.sub(r"\1.\2", name)


def vae_key_map(params: Mapping[str, Any]) -> KeyMap:
    """{Flax path: (torch key without prefix, kind)} for an AutoencoderKL params tree
    (arrays or ShapeDtypeStructs)."""
    key_map: dict[FlaxPath, tuple[str, str]] = {}
    for path, value in flatten_params(params).items():
        leaf, kind = torch_leaf(path[-1], len(value.shape))
        key_map[path] = (".".join([_torch_module(p) for p in path[:-1]] + [leaf]), kind)
    return key_map


def abstract_vae_params(model: AutoencoderKL) -> Mapping[str, Any]:
    """The model's params tree as ShapeDtypeStructs (no compute, no memory)."""
    cfg = normalize_ddconfig(model.ddconfig)
    # The smallest image the encoder accepts; only shapes are traced.
    side = 2 ** (len(cfg.get("ch_mult", (1, 2, 4, 8))) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, int(cfg["in_channels"])), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def vae_buffer_suffixes(model: AutoencoderKL) -> tuple[str, ...]:
    """Seed keys that are buffers, not params: a VideoDecoder's "fixed" `mix_factor`s (the
    constant is its config's `alpha`)."""
    if model.decoder_target != "VideoDecoder":
        return ()
    cfg = model.decoder_config or model.ddconfig
    return (".mix_factor",) if cfg.get("merge_strategy", "learned") == "fixed" else ()


def convert_vae(
    state_dict: Mapping[str, Any],
    model: AutoencoderKL,
    *,
    prefix: str = VAE_PREFIX,
    dtype: Any = None,
) -> dict[str, Any]:
    """Seed-layout VAE weights (flat `{key: array}`, possibly a whole SDXL/SD2 checkpoint)
    -> Flax params for `model` (numpy). Raises CheckpointMismatchError listing missing,
    unexpected (under `prefix`) and mis-shaped keys."""
    abstract = abstract_vae_params(model)
    return convert_state_dict(state_dict, vae_key_map(abstract), abstract, prefix=prefix, dtype=dtype,
                              ignore_unexpected=vae_buffer_suffixes(model))


def export_vae(params: Mapping[str, Any], *, prefix: str = VAE_PREFIX) -> dict[str, Any]:
    """Flax AutoencoderKL params -> seed-layout state dict (numpy, PyTorch layouts)."""
    return export_state_dict(params, vae_key_map(params), prefix=prefix)
