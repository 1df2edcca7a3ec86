"""Which parts of a DiffusionEngine train, and where the weights of the rest come from.

The seed's DiffusionEngine optimises the UNet and the embedders marked `is_trainable`; the
first stage and the other embedders are frozen. Here the two live in separate trees:

    trainable = {"model": ..., "conditioner": {"embedders_<i>": ...trainable i}}   # in TrainState
    frozen    = {"conditioner": {...frozen i with weights}, "first_stage": ...}     # loaded, never saved

Weights come from (later sources override earlier ones):
  * `model.params.ckpt_path`: a converted checkpoint directory (convert_torch_weights.py) with
    the whole engine: the starting point of a fine-tune (all parts);
  * `first_stage_config.params.ckpt_path`: an autoencoder train.py workdir or a converted
    directory (workdirs.load_first_stage);
  * otherwise trainable parts start from random initialisation. A frozen part that has
    weights but no source is an error: it would stay random forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from sgm_jax.convert.params_dir import load_params
from sgm_jax.engine import DiffusionEngine
from sgm_jax.errors import UserError

from .checkpoint import _shapes, first_mismatch
from .workdirs import load_first_stage

CONDITIONER, MODEL, FIRST_STAGE = "conditioner", "model", "first_stage"


def trainable_embedders(engine: DiffusionEngine) -> set[str]:
    return {f"embedders_{i}" for i, spec in enumerate(engine.conditioner.specs) if spec.is_trainable}


def split_params(engine: DiffusionEngine, params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a full engine param tree {"model", "conditioner", "first_stage"}."""
    keep = trainable_embedders(engine)
    cond = dict(params.get(CONDITIONER, {}))
    trainable = {MODEL: params[MODEL], CONDITIONER: {k: v for k, v in cond.items() if k in keep}}
    frozen: dict[str, Any] = {}
    frozen_cond = {k: v for k, v in cond.items() if k not in keep}
    if frozen_cond:
        frozen[CONDITIONER] = frozen_cond
    if FIRST_STAGE in params:
        frozen[FIRST_STAGE] = params[FIRST_STAGE]
    return trainable, frozen


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full engine tree the networks read (inverse of split_params)."""
    out = dict(trainable)
    for k, v in (frozen or {}).items():
        out[k] = {**out[k], **v} if k == CONDITIONER and k in out else v
    return out


def _first_mismatch(expected: Any, got: Any, where: str) -> None:
    problem = first_mismatch(_shapes(expected), _shapes(got))
    if problem:
        raise UserError(f"{where} does not fit this model config: {problem}")


def load_engine_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A converted engine directory (convert_torch_weights.py output) as a host param tree."""
    path = Path(ckpt_path).expanduser()
    if not (path / "metadata.json").is_file():
        raise UserError(f"model.params.ckpt_path {path} is not a converted checkpoint directory: create it with "
                        "`python convert_torch_weights.py --config <inference config> --checkpoint FILE --output DIR`")
    return load_params(path)


def load_frozen_and_initial(engine: DiffusionEngine, model_config: Mapping[str, Any],
                            abstract_full: Mapping[str, Any]) -> tuple[dict | None, dict]:
    """(initial trainable params or None for random init, frozen params), both host trees,
    checked against the config's abstract full tree `abstract_full` (with "first_stage" when the
    config has one)."""
    params = model_config.get("params", model_config)
    initial, frozen = None, {}
    if params.get("ckpt_path"):
        full = load_engine_checkpoint(params["ckpt_path"])
        wanted = {k: v for k, v in full.items() if k in abstract_full}
        _first_mismatch(abstract_full, wanted, f"model.params.ckpt_path {params['ckpt_path']}")
        initial, frozen = split_params(engine, wanted)
    fs_path = ((params.get("first_stage_config") or {}).get("params") or {}).get("ckpt_path")
    if fs_path and engine.first_stage is not None:
        _, fs_params = load_first_stage(fs_path)
        _first_mismatch(abstract_full[FIRST_STAGE], fs_params, f"first_stage_config.params.ckpt_path {fs_path}")
        frozen[FIRST_STAGE] = fs_params
    _, frozen_abstract = split_params(engine, abstract_full)
    for part, tree in frozen_abstract.items():
        have = frozen.get(part, {})
        names = tree if part == CONDITIONER else {part: tree}
        for name in names:
            if (part == CONDITIONER and name not in have) or (part != CONDITIONER and not have):
                where = ("first_stage_config.params.ckpt_path (an autoencoder workdir or converted directory)"
                         if part == FIRST_STAGE else "model.params.ckpt_path, or set is_trainable: True")
                raise UserError(f"the frozen {'first stage' if part == FIRST_STAGE else 'embedder ' + name} has no "
                                f"weights: set {where}")
    return initial, frozen


def floating_as(tree: Any, dtype: Any) -> Any:
    """`tree` with its floating leaves (arrays or jax.ShapeDtypeStructs) in `dtype`; others untouched."""
    target = np.dtype(jax.numpy.dtype(dtype))

    def cast(leaf: Any) -> Any:
        if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) or leaf.dtype == target:
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, target, sharding=leaf.sharding)
        return leaf.astype(target)

    return jax.tree_util.tree_map(cast, tree)


def abstract_full_params(engine: DiffusionEngine, example: Mapping[str, Any]) -> dict[str, Any]:
    """Shapes of every part of the engine, first stage included (nothing allocated); `example`
    may be pre-encoded (the images' shape is then that of the moments' stand-in)."""
    example = engine.raw_stand_in(example)
    tree = dict(jax.eval_shape(engine.init_params, jax.random.key(0), example))
    if engine.first_stage is not None:
        x = np.zeros((1,) + tuple(np.shape(example[engine.input_key]))[1:], np.float32)
        tree[FIRST_STAGE] = jax.eval_shape(lambda k: engine.first_stage.init(k, x)["params"], jax.random.key(0))
    return tree
