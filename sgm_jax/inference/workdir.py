"""Sample a model trained with train.py: its workdir's config.json, run.json and checkpoints.

    model = TrainedModel.load("workdir/mnist_cond_cpu")
    result = model.sample(conditions=[3, 7], num=4, seed=42)   # uint8 [8, 28, 28, 1], rows 3,3,3,3,7,...

Conditions are class ids for a class-conditional model (`cls`), prompts for a text-conditional
one (`txt`), or nothing for an unconditional one. Only the weights are restored (the EMA
ones by default), never the optimiser state, and the checkpoint's tree is checked against
the config before anything compiles. Sampling goes through the same compiled-once runner as
the SDXL pipelines (sgm_jax.inference.runner): a new condition, seed or CFG scale reuses it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from sgm_jax.checkpointing.checkpoint import check_tree_matches, restore_params, step_dirs
from sgm_jax.checkpointing.frozen import abstract_full_params, split_params
from sgm_jax.checkpointing.lora_params import LORA, as_pairs, frozen_parts, full_params, lora_settings, new_adapters
from sgm_jax.checkpointing.workdirs import read_workdir_config
from sgm_jax.engine import DiffusionEngine, build_engine
from sgm_jax.errors import UserError
from sgm_jax.model_inputs import example_batch
from sgm_jax.sampling_defaults import SamplingDefaults

from .pipeline import Pipeline


def inference_defaults(engine: DiffusionEngine, image_shape: Sequence[int]) -> dict[str, Any]:
    """The `inference` section a workdir's config gets (what configs/inference/* hold for SDXL):
    the training config's sampler, steps and CFG scale; overridable with --config.inference.x=y."""
    return SamplingDefaults.for_trained(engine, image_shape).section()


def restore_weights(workdir: Path, engine: DiffusionEngine, image_shape: tuple[int, ...], use_ema: bool = True,
                    step: int | None = None, config: Any = None) -> tuple[int, Any]:
    """(step, params): the checkpoint's tree is checked against the config (one line naming the
    first mismatched key, no compile), then only params / ema_params are read, and the frozen
    parts training never saved (first stage, frozen text towers, a LoRA's base) are loaded from
    where the config's ckpt_paths say (sgm_jax.checkpointing.frozen / lora_params)."""
    ckpt_dir = workdir / "checkpoints"
    steps = step_dirs(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first with train.py --workdir {workdir}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {ckpt_dir}; there are: {', '.join(map(str, steps))}")
    config = config if config is not None else {"model": {}}
    lora = lora_settings(config)
    example = example_batch(engine, image_shape)
    abstract = abstract_full_params(engine, example)
    expected = (jax.eval_shape(lambda: new_adapters(abstract, lora, jax.random.key(0))) if lora is not None
                else split_params(engine, abstract)[0])
    check_tree_matches(ckpt_dir / str(step if step is not None else steps[0]), {"params": expected},
                       prefixes=("params.",))
    def skipped(bad: int, reason: str) -> None:  # train.py's warning line: which step, why
        print(f"warning: checkpoint {bad} does not restore ({reason}); sampling from the previous one",
              file=sys.stderr)

    step, params = restore_params(ckpt_dir, step=step, use_ema=use_ema, on_skip=skipped)
    bad = next((jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(params)
                if not np.isfinite(np.asarray(v)).all()), None)
    if bad is not None:  # a run that diverged before the finite-update guard existed: images would be noise
        raise UserError(f"checkpoint {step} in {ckpt_dir} holds non-finite weights ({bad}): the run diverged; "
                        "sample an earlier step (--step) or retrain with a lower learning rate")
    _, frozen = frozen_parts(engine, config, abstract, example, lora)
    if lora is not None:  # checkpoints keep down / up only: alpha comes from the config
        params = {LORA: as_pairs(params[LORA], lora.alpha)}
    return step, full_params(lora, params, frozen)


class TrainedModel(Pipeline):
    """A train.py workdir's model: the one sampling Pipeline, its weights restored from the
    workdir's checkpoints (weights on a data-parallel mesh, compiled once)."""

    def __init__(self, workdir: str | Path, config: Any, engine: DiffusionEngine, params: Any, step: int,
                 image_shape: tuple[int, ...], mesh: jax.sharding.Mesh | None = None, clip_tokenizer: Any = None,
                 step_progress: bool | None = None) -> None:
        super().__init__(config, params, engine=engine, image_shape=image_shape, clip_tokenizer=clip_tokenizer,
                         mesh=mesh, name=Path(workdir).name, step_progress=step_progress)
        self.workdir, self.step = Path(workdir), step

    @classmethod
    def load(cls, workdir: str | Path, *, use_ema: bool = True, step: int | None = None, config: Any = None,
             **kw: Any) -> "TrainedModel":
        """config: the workdir's config.json with --config overrides applied (read_workdir_config
        + sgm_jax.cli.configs.apply_overrides); None reads it as saved. kw: mesh, clip_tokenizer,
        step_progress."""
        workdir = Path(workdir)
        config = config if config is not None else read_workdir_config(workdir)
        engine = build_engine(config.model, dtype=config.training.dtype)
        config = with_inference_section(workdir, config, engine)
        image_shape = workdir_image_shape(workdir)
        step, params = restore_weights(workdir, engine, image_shape, use_ema, step, config)
        return cls(workdir, config, engine, params, step, image_shape, **kw)


def workdir_image_shape(workdir: Path) -> tuple[int, ...]:
    run = Path(workdir) / "run.json"
    shape = json.loads(run.read_text()).get("image_shape") if run.is_file() else None
    if not shape:
        raise FileNotFoundError(f"{run} (written by train.py, it records the image shape) is missing or empty")
    return tuple(int(x) for x in shape)


def with_inference_section(workdir: Path, config: ConfigDict, engine: DiffusionEngine | None = None) -> ConfigDict:
    """The workdir config with an `inference` section: its own sampler defaults under whatever
    the saved config already says (a section already complete is kept as it is). `engine`: the
    config's, when the caller has built it (only its sampler and conditioner are read)."""
    given = config.inference.to_dict() if "inference" in config else {}
    if set(given) >= set(SamplingDefaults.fields()):
        return config
    engine = engine if engine is not None else build_engine(config.model)
    section = SamplingDefaults.for_trained(engine, workdir_image_shape(workdir), **given).section()
    with config.unlocked():
        config.inference = section
    return config


# --- one-call helpers (tests, benchmarks, evaluate.py) ----------------------------------------


def load_trained(workdir: str | Path, use_ema: bool = True, step: int | None = None):
    """(config, engine, params, run_info) of a training run (weights only; EMA when asked and present)."""
    workdir = Path(workdir)
    config = read_workdir_config(workdir)
    engine = build_engine(config.model, dtype=config.training.dtype)
    _, params = restore_weights(workdir, engine, workdir_image_shape(workdir), use_ema, step, config)
    run = json.loads((workdir / "run.json").read_text())
    return config, engine, params, run


def sample_trained(workdir: str | Path, classes: list[int], num_per_class: int = 1, sampler: str | None = None,
                   steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                   use_ema: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """images [N, H, W, C] in [-1, 1] (the uint8 PNG values) and labels [N], N = len(classes) * num_per_class."""
    model = TrainedModel.load(workdir, use_ema=use_ema)
    try:
        result = model.sample(classes, num=num_per_class, seed=seed, spec=model.spec(sampler, steps),
                              cfg_scale=cfg_scale)
    except UserError as e:
        raise ValueError(str(e)) from None
    labels = np.repeat(np.asarray(classes if model.conditional else [0], np.int32), num_per_class)
    return result.images.astype(np.float32) / 127.5 - 1.0, labels


__all__ = ["TrainedModel", "example_batch", "inference_defaults", "load_trained",
           "restore_weights", "sample_trained", "with_inference_section"]
