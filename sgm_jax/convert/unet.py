"""UNetModel <-> seed checkpoint (`model.diffusion_model.*`) conversion.

`sgm_jax.nn.unet` names its submodules after the seed's module tree, so the key map is a
rule on each Flax path rather than a table:
  * a module name `<name>_<index>` is the seed's `<name>.<index>` (`input_blocks_4` ->
    `input_blocks.4`, `in_layers_2` -> `in_layers.2`, `to_out_0` -> `to_out.0`); children
    named `0`, `1`, ... are already indices;
  * leaves: Dense `kernel` -> `weight` ("linear"), Conv `kernel` -> `weight` ("conv"),
    norm `scale` -> `weight`, Embed `embedding` -> `weight`, `bias` -> `bias` ("copy"),
    AlphaBlender `mix_factor` -> `mix_factor` ("copy").
The same rule covers `sgm_jax.nn.video_unet.VideoUNet` (SVD), whose modules mirror the seed's
`video_model.VideoUNet`; its Conv3d kernels are "conv" with one more axis.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax

from sgm_jax.convert.common import (
    FlaxPath,
    convert_state_dict,
    export_state_dict,
    flatten_params,
)
from sgm_jax.nn.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def _torch_leaf(name: str, ndim: int) -> tuple[str, str]:
    if name == "kernel":
        if ndim in (4, 5):  # Conv2d; Conv3d (VideoUNet's temporal ResBlocks)
            return "weight", "conv"
        if ndim == 2:
            return "weight", "linear"
        raise ValueError(f"unexpected {ndim}-d kernel")
    if name in ("scale", "embedding"):
        return "weight", "copy"
    if name == "bias":
        return "bias", "copy"
    if name == "mix_factor":  # VideoUNet's AlphaBlender, a [1] parameter in the seed too
        return "mix_factor", "copy"
    raise ValueError(f"no seed name for Flax param {name!r}")


def flax_path_to_torch(path: FlaxPath, ndim: int) -> tuple[str, str]:
    """One Flax param path -> (seed key without prefix, transform kind)."""
    modules = [_INDEXED.sub(r"\1.\2", name) for name in path[:-1]]
    leaf, kind = _torch_leaf(path[-1], ndim)
    return ".".join(modules + [leaf]), kind


def unet_key_map(abstract_params: Mapping[str, Any]) -> dict[FlaxPath, tuple[str, str]]:
    """{Flax path: (seed key without prefix, kind)} for every param of a UNetModel params tree
    (arrays or ShapeDtypeStructs, without the outer {"params": ...})."""
    return {
        path: flax_path_to_torch(path, len(value.shape))
        for path, value in flatten_params(abstract_params).items()
    }


def make_unet(unet_kwargs: Mapping[str, Any], network_cls: type[UNetModel] = UNetModel, **overrides: Any) -> UNetModel:
    """UNetModel (or `network_cls`, e.g. VideoUNet) from seed-style kwargs (dict or ml_collections ConfigDict)."""
    kwargs = dict(unet_kwargs.items())
    kwargs.update(overrides)
    return network_cls(**kwargs)


def unet_buffer_suffixes(model: UNetModel) -> tuple[str, ...]:
    """Seed state-dict keys that are buffers, not params: a "fixed" AlphaBlender's constant
    `mix_factor` (sgm_jax keeps it in the config), accepted and left out on conversion."""
    return ("time_mixer.mix_factor",) if getattr(model, "merge_strategy", None) == "fixed" else ()


def unet_abstract_params(model: UNetModel) -> dict[str, Any]:
    """The params tree of `model` as ShapeDtypeStructs (nothing is allocated)."""
    variables = jax.eval_shape(lambda key: model.init(key, **model.example_inputs()), jax.random.key(0))
    return variables["params"]


def convert_unet(
    state_dict: Mapping[str, Any],
    unet_kwargs: Mapping[str, Any],
    prefix: str = UNET_PREFIX,
    dtype: Any = None,
    network_cls: type[UNetModel] = UNetModel,
) -> dict[str, Any]:
    """Seed state dict (`{key: array}`, may be a whole checkpoint) -> UNetModel params
    (VideoUNet params with `network_cls=VideoUNet`).

    Raises `CheckpointMismatchError` listing missing, unexpected (under `prefix`) and
    mis-shaped keys. Returns a params tree of numpy arrays (`dtype=None` keeps the stored
    dtype); use it as `model.apply({"params": params}, ...)`.
    """
    model = make_unet(unet_kwargs, network_cls)
    abstract = unet_abstract_params(model)
    return convert_state_dict(state_dict, unet_key_map(abstract), abstract, prefix=prefix, dtype=dtype,
                              ignore_unexpected=unet_buffer_suffixes(model))


def export_unet(params: Mapping[str, Any], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """UNetModel params -> seed-layout state dict (numpy, PyTorch layouts), the inverse of
    `convert_unet`."""
    return export_state_dict(params, unet_key_map(params), prefix=prefix)
