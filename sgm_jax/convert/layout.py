"""Where each part of a DiffusionEngine lives in a seed checkpoint.

A `Part` ties a subtree of the engine params
`{"model": ..., "conditioner": {"embedders_<i>": ...}, "first_stage": ...}` to a key prefix
of the checkpoint and to that network's key map (from sgm_jax.convert.unet / vae / text):

  model                      model.diffusion_model.                         UNetModel
  first_stage                first_stage_model.                             AutoencoderKL
  conditioner.embedders_i    conditioner.embedders.<i>.transformer.text_model.   FrozenCLIPEmbedder
                             conditioner.embedders.<i>.model.               FrozenOpenCLIPEmbedder2
                             cond_stage_model.model.   (SD 2.x files)       FrozenOpenCLIPEmbedder
                             conditioner.embedders.<i>.                     other embedders with params
  (ConcatTimestepEmbedderND, IdentityEncoder: no params, no keys)

Shapes come from `jax.eval_shape` of each network's init: nothing is allocated, so the
full-size SDXL layout is known in seconds.

Keys a real checkpoint holds that are not parameters of ours, and why they are ignored
(from the buffers the seed's modules and the original LatentDiffusion register; the
released SDXL files carry only `position_ids` and `logit_scale` of these, SD 2.x files
the DDPM buffers, training checkpoints the rest):
  * `betas`, `alphas_cumprod`, ..., `posterior_mean_coef2`, `logvar`, `lvlb_weights`,
    `scale_factor`: buffers of the original LatentDiffusion (SD 2.x files); the noise
    schedule is rebuilt from the config (`denoiser_config`), as the seed itself does;
  * `denoiser.*`: DiscreteDenoiser's `sigmas` buffer (seed-trained files), same reason;
  * `model_ema.*`: the EMA copy of the UNet (`use_ema=True` converts it instead);
  * `loss.*`, `first_stage_model.loss.*`: training losses (LPIPS / discriminator);
  * under a CLIP prefix `...embeddings.position_ids` (transformers' arange buffer), under
    an OpenCLIP prefix `logit_scale` (contrastive temperature) and `attn_mask` (the
    causal mask, rebuilt in code).
Everything else that is not consumed is reported as unexpected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp

from sgm_jax.convert.common import FlaxPath, KeyMap, flatten_params, torch_shape, unflatten_params
from sgm_jax.convert.text import (CLIP_IGNORED_SUFFIXES, OPENCLIP_IGNORED_SUFFIXES, abstract_embedder_params,
                                  clip_text_prefix, text_key_map)
from sgm_jax.convert.unet import flax_path_to_torch, unet_abstract_params, unet_buffer_suffixes, unet_key_map
from sgm_jax.convert.vae import VAE_PREFIX, abstract_vae_params, vae_key_map
from sgm_jax.engine import DiffusionEngine, build_engine

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
SD2_TEXT_PREFIX = "cond_stage_model.model."

DDPM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor",
})
IGNORED_PREFIXES = ("model_ema.", "denoiser.", "loss.", "first_stage_model.loss.")
PARAM_FREE_EMBEDDERS = frozenset({"ConcatTimestepEmbedderND", "IdentityEncoder"})
# Example inputs (shape, dtype) to trace the init of non-text embedders that own params.
# SVD's image embedders: an RGB frame (any size: their params do not depend on it)
VIDEO_EMBEDDER_INPUTS = {"FrozenOpenCLIPImagePredictionEmbedder": (1, 32, 32, 3),
                         "VideoPredictionEmbedderWithEncoder": (1, 32, 32, 3)}
_EMBEDDER_INPUTS = {"ClassEmbedder": ((1,), jnp.int32), "ClassEmbedderForMultiCond": ((1,), jnp.int32)}


@dataclass(frozen=True)
class Part:
    """One network of the engine inside a checkpoint.

    name: "model", "first_stage" or "conditioner.embedders_<i>" (dotted params path).
    params_path: path of the subtree in the engine params tree.
    prefix: checkpoint key prefix of the subtree.
    key_map: {Flax path relative to the subtree: (checkpoint key without prefix, kind)}.
    shapes: {Flax path: Flax shape} from the abstract init.
    ignore_suffixes: keys under `prefix` ending so are buffers, not parameters.
    ignore_prefixes: parts of the seed's module that sgm_jax never runs (SVD's image embedder keeps
      OpenCLIP's text-side tensors, its frame encoder a whole AutoencoderKL with its decoder).
    """

    name: str
    params_path: FlaxPath
    prefix: str
    key_map: KeyMap
    shapes: Mapping[FlaxPath, tuple[int, ...]]
    ignore_suffixes: tuple[str, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()  # whole checkpoint keys starting so: the seed's, unused here

    def keys(self) -> dict[str, tuple[FlaxPath, str, tuple[int, ...]]]:
        """{full checkpoint key: (Flax path in the subtree, kind, PyTorch shape)}."""
        return {self.prefix + key: (path, kind, torch_shape(kind, self.shapes[path]))
                for path, (key, kind) in self.key_map.items()}


def as_engine(config: Any) -> DiffusionEngine:
    """A DiffusionEngine from an engine, a full config (with `.model`) or a `model` section."""
    if isinstance(config, DiffusionEngine):
        return config
    if hasattr(config, "get") and config.get("model") is not None and "network_config" not in config:
        config = config["model"]
    return build_engine(config, "float32")


def _shapes(abstract: Mapping[str, Any]) -> dict[FlaxPath, tuple[int, ...]]:
    return {p: tuple(int(d) for d in v.shape) for p, v in flatten_params(abstract).items()}


_ABSTRACT_CACHE: dict[str, Any] = {}


def _abstract(fn: Callable[[Any], Any], module: Any) -> Any:
    """`fn(module)` (an abstract init), memoised by the module's repr (its full config):
    tracing the full-size SDXL UNet takes seconds and conversion asks more than once."""
    key = f"{fn.__module__}.{fn.__name__}:{module!r}"
    if key not in _ABSTRACT_CACHE:
        if len(_ABSTRACT_CACHE) > 32:
            _ABSTRACT_CACHE.clear()
        _ABSTRACT_CACHE[key] = fn(module)
    return _ABSTRACT_CACHE[key]


def _has_prefix(keys: Collection[str] | None, prefix: str) -> bool:
    return keys is not None and any(k.startswith(prefix) for k in keys)


def _ema_key_map(key_map: KeyMap) -> KeyMap:
    # The seed's LitEma names a buffer after the wrapped module's parameter with the dots
    # removed: model.diffusion_model.a.0.weight -> model_ema.diffusion_modela0weight.
    return {p: ("diffusion_model" + k.replace(".", ""), kind) for p, (k, kind) in key_map.items()}


def _embedder_part(i: int, spec: Any, keys: Collection[str] | None) -> Part | None:
    if spec.target in PARAM_FREE_EMBEDDERS:
        return None
    embedder = spec.build()
    name, path = f"conditioner.embedders_{i}", ("conditioner", f"embedders_{i}")
    base = f"conditioner.embedders.{i}."
    if spec.target == "FrozenCLIPEmbedder":
        tower = _abstract(abstract_embedder_params, embedder)["transformer"]
        # transformers 4.x (every released SDXL file) nests the model under `text_model.`.
        prefix = clip_text_prefix(keys, base + "transformer.")
        return Part(name, path + ("transformer",), prefix, text_key_map(tower), _shapes(tower), CLIP_IGNORED_SUFFIXES)
    if spec.target in ("FrozenOpenCLIPEmbedder2", "FrozenOpenCLIPEmbedder"):
        tower = _abstract(abstract_embedder_params, embedder)["model"]
        prefix = base + "model."
        # SD 2.x files (the original LatentDiffusion) keep their one text encoder here.
        if spec.target == "FrozenOpenCLIPEmbedder" and i == 0 and not _has_prefix(keys, prefix):
            prefix = SD2_TEXT_PREFIX
        return Part(name, path + ("model",), prefix, text_key_map(tower), _shapes(tower), OPENCLIP_IGNORED_SUFFIXES)
    if spec.target in VIDEO_EMBEDDER_INPUTS:  # SVD's image conditioning: a picture in, abstract init
        frames = jax.ShapeDtypeStruct(VIDEO_EMBEDDER_INPUTS[spec.target], jnp.float32)
        abstract = jax.eval_shape(lambda x: embedder.init(jax.random.key(0), x), frames)["params"]
        if spec.target == "FrozenOpenCLIPImagePredictionEmbedder":
            tower = abstract["open_clip"]["visual"]
            # the seed deletes open_clip's text transformer but keeps the rest of its text side
            text_side = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale",
                         "attn_mask")
            return Part(name, path + ("open_clip", "visual"), base + "open_clip.model.visual.", text_key_map(tower),
                        _shapes(tower), ignore_prefixes=tuple(base + "open_clip.model." + t for t in text_side))
        encoder = abstract["encoder"]
        return Part(name, path + ("encoder",), base + "encoder.", vae_key_map(encoder), _shapes(encoder),
                    ignore_prefixes=(base + "encoder.decoder.", base + "encoder.post_quant_conv."))
    if spec.target in _EMBEDDER_INPUTS:
        shape, dtype = _EMBEDDER_INPUTS[spec.target]
        x = jax.ShapeDtypeStruct(shape, dtype)
        abstract = jax.eval_shape(lambda x: embedder.init(jax.random.key(0), x), x).get("params", {})
        if not abstract:
            return None
        key_map = {p: flax_path_to_torch(p, len(v.shape)) for p, v in flatten_params(abstract).items()}
        return Part(name, path, base, key_map, _shapes(abstract))
    raise NotImplementedError(f"embedder {i} ({spec.target}): no checkpoint mapping in sgm_jax.convert")


def engine_parts(config: Any, keys: Collection[str] | None = None, *, use_ema: bool = False) -> list[Part]:
    """The checkpoint layout of the engine built from `config`.

    `keys`: the checkpoint's keys, to pick between equivalent layouts (CLIP with or without
    `text_model.`, SD 2.x `cond_stage_model.model.` or `conditioner.embedders.0.model.`);
    None gives the layout of the released files (what export writes). `use_ema`: read the
    UNet from the seed's `model_ema.*` buffers instead of `model.diffusion_model.*`.
    """
    engine = as_engine(config)
    parts = []
    unet_abstract = _abstract(unet_abstract_params, engine.network)
    unet_map = unet_key_map(unet_abstract)
    if use_ema:
        parts.append(Part("model", ("model",), EMA_PREFIX, _ema_key_map(unet_map), _shapes(unet_abstract)))
    else:
        parts.append(Part("model", ("model",), UNET_PREFIX, unet_map, _shapes(unet_abstract),
                          unet_buffer_suffixes(engine.network)))
    for i, spec in enumerate(engine.conditioner.specs):
        part = _embedder_part(i, spec, keys)
        if part is not None:
            parts.append(part)
    if engine.first_stage is not None:
        vae_abstract = _abstract(abstract_vae_params, engine.first_stage)
        parts.append(Part("first_stage", ("first_stage",), VAE_PREFIX, vae_key_map(vae_abstract),
                          _shapes(vae_abstract)))
    return parts


def is_ignored(key: str, parts: list[Part], *, use_ema: bool = False) -> bool:
    """True for checkpoint entries that are known buffers / training state, not our params
    (only asked about keys no part consumes)."""
    if key in DDPM_BUFFERS:
        return True
    if use_ema and (key.startswith(UNET_PREFIX) or key in ("model_ema.decay", "model_ema.num_updates")):
        return True  # the raw weights, superseded by the EMA ones; the EMA's own counters
    if key.startswith(IGNORED_PREFIXES) and not (use_ema and key.startswith(EMA_PREFIX)):
        return True
    if any(key.startswith(p.ignore_prefixes) for p in parts if p.ignore_prefixes):
        return True
    return any(key.startswith(p.prefix) and key.endswith(p.ignore_suffixes) for p in parts if p.ignore_suffixes)


def checkpoint_shapes(config: Any, *, use_ema: bool = False) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: PyTorch shape} of every parameter of the engine, in the released
    files' layout. Abstract only: usable for the full-size models without any weights."""
    return {k: shape for part in engine_parts(config, use_ema=use_ema) for k, (_, _, shape) in part.keys().items()}


def abstract_engine_params(parts: list[Part], dtype: Any = jnp.float32) -> dict[str, Any]:
    """The engine params tree that converting a checkpoint of these parts gives, as jax.ShapeDtypeStructs
    in `dtype` (nothing allocated: the full-size models' trees from shapes alone)."""
    return unflatten_params({part.params_path + path: jax.ShapeDtypeStruct(shape, dtype)
                             for part in parts for path, shape in part.shapes.items()})


def guess_family(keys: Collection[str]) -> str | None:
    """Which released model a checkpoint's keys look like (for error messages)."""
    has: Callable[[str], bool] = lambda p: _has_prefix(keys, p)
    if not has(UNET_PREFIX) and not has(EMA_PREFIX):
        return "no UNet weights (model.diffusion_model.*): not a full diffusion checkpoint"
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "an SDXL base checkpoint (CLIP-L + OpenCLIP-G)"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1.model."):
        # SD 2.x attends at the first level (input_blocks.1.1), the refiner does not
        if has(UNET_PREFIX + "input_blocks.1.1."):
            return "an SD 2.x checkpoint in sgm's layout (OpenCLIP-H under conditioner.embedders.0.model.: SD-Turbo)"
        return "an SDXL refiner checkpoint (OpenCLIP-G only)"
    if has(SD2_TEXT_PREFIX):
        return "an SD 2.x checkpoint (OpenCLIP-H under cond_stage_model.model.)"
    if has("cond_stage_model.transformer."):
        return "an SD 1.x checkpoint (CLIP-L under cond_stage_model.transformer.)"
    return None
