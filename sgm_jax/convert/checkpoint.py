"""Whole-engine conversion: a seed checkpoint (SDXL base / refiner, SD 2.x, or any config of
ours) <-> the engine params tree `{"model", "conditioner": {"embedders_<i>"}, "first_stage"}`.

    convert_file("sd_xl_base_1.0.safetensors", config, "checkpoints/sd_xl_base")  # the CLI's path
    params = load_params("checkpoints/sd_xl_base")               # what sample.py uses

    sd = open_checkpoint("sd_xl_base_1.0.safetensors")          # lazy, tensor by tensor
    params = convert_checkpoint(sd, config, dtype="keep")        # validates everything first
    sd = export_checkpoint(params, config)                       # inverse, bit-exact
    save_safetensors(sd, "out.safetensors")

`convert_file` streams (read, convert and write ~1 GiB at a time: SDXL converts in ~2.4 GB
of RAM); `convert_checkpoint` returns the whole tree in memory.

The layout (which prefix each network has, which extra keys are ignored and why) is in
`sgm_jax.convert.layout`; the per-network key maps in unet.py / vae.py / text.py.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from sgm_jax.convert.common import (
    CheckpointMismatchError,
    FlaxPath,
    to_flax_layout,
    to_torch_layout,
    unflatten_params,
)
from sgm_jax.convert.files import CheckpointFileError, open_checkpoint, save_safetensors
from sgm_jax.convert.layout import Part, checkpoint_shapes, engine_parts, guess_family, is_ignored
from sgm_jax.convert.atomic import stop_on_signals
from sgm_jax.convert.params_dir import (SHARD_BYTES, check_output, load_params, read_metadata, save_params,
                                        to_numpy_dtype)

__all__ = [
    "CheckpointFileError", "CheckpointMismatchError", "check_output", "checkpoint_shapes", "convert_checkpoint",
    "convert_file", "engine_parts", "export_checkpoint", "iter_converted", "load_params", "open_checkpoint",
    "read_metadata", "save_params", "save_safetensors", "validate_checkpoint",
]

SHOWN_PER_KIND = 6  # keys listed per problem kind; the counts are always complete


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    fn = getattr(state_dict, "shape_of", None)
    return tuple(int(d) for d in fn(key)) if fn is not None else tuple(np.shape(state_dict[key]))


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - SHOWN_PER_KIND} more)" if len(items) > SHOWN_PER_KIND else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:SHOWN_PER_KIND]) + more


def validate_checkpoint(state_dict: Mapping[str, Any], parts: list[Part], *, use_ema: bool = False) -> None:
    """Raise one CheckpointMismatchError listing, across all parts, the missing keys,
    unexpected keys (not consumed and not a known non-parameter, see layout.py) and
    mis-shaped keys. Reads shapes only (the safetensors header), no tensor data."""
    wanted: dict[str, tuple[int, ...]] = {}
    for part in parts:
        wanted.update({k: shape for k, (_, _, shape) in part.keys().items()})
    present = set(state_dict.keys())
    missing = sorted(k for k in wanted if k not in present)
    unexpected = sorted(k for k in present if k not in wanted and not is_ignored(k, parts, use_ema=use_ema))
    misshaped = []
    for key in sorted(present.intersection(wanted)):
        got = _shape_of(state_dict, key)
        if got != wanted[key]:
            misshaped.append(f"{key} {list(got)} (expected {list(wanted[key])})")
    problems = [_listing(title, items) for title, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if items]
    if problems:
        family = guess_family(present)
        hint = f" (it looks like {family})" if family else ""
        raise CheckpointMismatchError(f"checkpoint does not match the config{hint}: " + "; ".join(problems))


def convert_checkpoint(state_dict: Mapping[str, Any], config: Any, dtype: Any = "keep", *,
                       use_ema: bool = False, parts: list[Part] | None = None) -> dict[str, Any]:
    """Seed-layout checkpoint (`{key: array}`, may be lazy) -> engine params tree of numpy arrays.

    config: a full config (`config.model` in the seed's yaml layout), its `model` section,
    or a DiffusionEngine. dtype: "keep" (the stored dtype, e.g. float16 for SDXL files),
    "float32", "bfloat16", "float16". use_ema: take the UNet from the `model_ema.*` buffers.
    Validates every part before reading any tensor; raises CheckpointMismatchError. Tensors
    are read, transposed (PyTorch -> Flax layout) and cast one at a time, so peak memory is
    the converted tree plus one tensor. `parts`: a precomputed `engine_parts(config,
    state_dict.keys(), use_ema=use_ema)`.
    """
    if parts is None:
        parts = engine_parts(config, state_dict.keys(), use_ema=use_ema)
    validate_checkpoint(state_dict, parts, use_ema=use_ema)
    return unflatten_params(dict(iter_converted(state_dict, parts, dtype)))


def iter_converted(state_dict: Mapping[str, Any], parts: list[Part], dtype: Any = "keep"
                   ) -> Iterator[tuple[FlaxPath, np.ndarray]]:
    """(engine params path, Flax-layout array) for every parameter, read one at a time.
    Call `validate_checkpoint` first."""
    target = None if dtype in (None, "keep") else to_numpy_dtype(dtype)
    for part in parts:
        for key, (path, kind, _) in part.keys().items():
            array = to_flax_layout(kind, np.asarray(state_dict[key]))
            if target is not None and array.dtype != target:
                array = array.astype(target)
            yield part.params_path + path, array


def export_checkpoint(params: Mapping[str, Any], config: Any, *, dtype: Any = "keep") -> dict[str, np.ndarray]:
    """Engine params tree -> seed-layout `{key: np.ndarray}` (PyTorch layouts, the released
    files' prefixes: CLIP under `text_model.`, SD 2.x text under `cond_stage_model.model.`).
    The inverse of `convert_checkpoint`: exporting then converting is bit-exact. Raises
    CheckpointMismatchError if `params` lacks or mis-shapes a parameter of the config."""
    target = None if dtype in (None, "keep") else to_numpy_dtype(dtype)
    out: dict[str, np.ndarray] = {}
    problems = []
    for part in engine_parts(config):
        for key, (path, kind, _) in part.keys().items():
            full = part.params_path + path
            value = _get(params, full)
            if value is None:
                problems.append(f"{'.'.join(full)} missing")
                continue
            if tuple(np.shape(value)) != part.shapes[path]:
                problems.append(f"{'.'.join(full)} {list(np.shape(value))} (expected {list(part.shapes[path])})")
                continue
            array = to_torch_layout(kind, np.asarray(value))
            out[key] = array.astype(target) if target is not None and array.dtype != target else array
    if problems:
        raise CheckpointMismatchError(_listing("params not matching the config", problems))
    return out


def _get(tree: Mapping[str, Any], path: FlaxPath) -> Any:
    node: Any = tree
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def convert_file(checkpoint: str | os.PathLike, config: Any, output: str | os.PathLike, *, dtype: Any = "keep",
                 allow_pickle: bool = False, overwrite: bool = False, use_ema: bool = False,
                 metadata: Mapping[str, Any] | None = None, shard_bytes: int = SHARD_BYTES,
                 handle_signals: bool = True) -> Path:
    """checkpoint file -> Orbax params directory `output`, atomically: on any error `output`
    is untouched and nothing is left beside it. With `handle_signals` (main thread only),
    SIGTERM / SIGINT stop the write at the next shard, remove the partial output and raise
    `atomic.Interrupted` (a UserError); temp dirs of runs killed outright are removed here."""
    check_output(output, overwrite)
    sd = open_checkpoint(checkpoint, allow_pickle=allow_pickle)
    try:
        parts = engine_parts(config, sd.keys(), use_ema=use_ema)
        try:
            validate_checkpoint(sd, parts, use_ema=use_ema)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{checkpoint}: {e}") from None
        meta = {"source": str(Path(checkpoint).name), "source_bytes": Path(checkpoint).stat().st_size,
                "dtype": str(dtype), "use_ema": use_ema, "prefixes": {p.name: p.prefix for p in parts}}
        meta.update(metadata or {})
        # Streamed: tensors are read, converted and written shard by shard.
        with stop_on_signals() if handle_signals else nullcontext() as stop:
            return save_params(iter_converted(sd, parts, dtype), output, meta, overwrite=overwrite,
                               shard_bytes=shard_bytes, stop=stop)
    finally:
        sd.close()
