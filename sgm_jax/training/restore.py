"""Load a training workdir (config.json + Orbax checkpoints) and sample from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from sgm_jax.diffusion.guiders import IdentityGuider, VanillaCFG
from sgm_jax.diffusion.samplers import get_sampler
from sgm_jax.engine import DiffusionEngine, build_engine

from .checkpoint import Checkpointer


def load_config(workdir: str | Path) -> ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.py --workdir?")
    return ConfigDict(json.loads(path.read_text()))


def example_batch(engine: DiffusionEngine, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A 1-example batch with the inputs the conditioner reads (class labels for the toy models)."""
    batch = {engine.input_key: np.zeros((1,) + tuple(image_shape), np.float32)}
    for spec in engine.conditioner.specs:
        if spec.input_key == "cls":
            batch["cls"] = np.zeros((1,), np.int32)
    return batch


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_trained(workdir: str | Path, use_ema: bool = True, step: int | None = None):
    """(config, engine, params, run_info) of a training run; EMA params when present and asked for."""
    workdir = Path(workdir)
    config = load_config(workdir)
    run = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").is_file() else {}
    engine = build_engine(config.model, dtype=config.training.get("dtype", "float32"))
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}: train first with train.py --workdir {workdir}")
    checkpointer = Checkpointer(ckpt_dir)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first with train.py --workdir {workdir}")
    import orbax.checkpoint as ocp

    restored = checkpointer.manager.restore(step if step is not None else checkpointer.latest_step(),
                                            args=ocp.args.StandardRestore())
    checkpointer.close()
    ema = restored.get("ema_params")
    params = ema if (use_ema and ema is not None) else restored["params"]
    image_shape = tuple(run.get("image_shape", ()))
    if image_shape:
        expected = _shapes(jax.eval_shape(engine.init_params, jax.random.key(0), example_batch(engine, image_shape)))
        got = _shapes(params)
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
            raise ValueError(f"checkpoint in {ckpt_dir} does not match its config.json (first differences: {diff})")
    return config, engine, params, run


def sample_trained(workdir: str | Path, classes: list[int], num_per_class: int = 1, sampler: str | None = None,
                   steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                   use_ema: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """images [N, H, W, C] in [-1, 1] and their labels [N], N = len(classes) * num_per_class."""
    config, engine, params, run = load_trained(workdir, use_ema=use_ema)
    conditional = any(s.input_key == "cls" for s in engine.conditioner.specs)
    if not conditional and (classes or cfg_scale):
        raise ValueError(f"the model in {workdir} is unconditional: drop --classes / --cfg-scale")
    base = engine.sampler
    guider = base.guider if base is not None else IdentityGuider()
    if cfg_scale is not None:
        guider = VanillaCFG(float(cfg_scale)) if cfg_scale != 1.0 else IdentityGuider()
    kwargs = {"num_steps": steps or (base.num_steps if base is not None else 50), "guider": guider}
    if base is not None:
        kwargs["discretization"] = base.discretization
    smp = get_sampler(sampler, **kwargs) if sampler else dataclasses.replace(base, **kwargs)
    labels = np.repeat(np.asarray(classes if conditional else [0], np.int32), num_per_class)
    for c in labels:
        n_classes = next((int(s.params.get("n_classes", 1000)) for s in engine.conditioner.specs
                          if s.input_key == "cls"), None)
        if n_classes is not None and not 0 <= c < n_classes:
            raise ValueError(f"class {c} out of range: this model has {n_classes} classes")
    image_shape = tuple(run.get("image_shape", (28, 28, 1)))
    from .loop import make_sample_fn

    sample = make_sample_fn(engine, engine.latent_shape((len(labels),) + image_shape), sampler=smp)
    batch = {"cls": labels} if conditional else {}
    images = np.asarray(jax.device_get(sample(params, batch, jax.random.key(seed))))
    return images, labels
