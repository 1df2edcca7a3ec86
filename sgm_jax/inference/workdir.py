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
from typing import Any, Callable, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from sgm_jax.checkpointing.checkpoint import check_tree_matches, restore_params, step_dirs
from sgm_jax.checkpointing.frozen import abstract_full_params, split_params
from sgm_jax.checkpointing.lora_params import LORA, as_pairs, frozen_parts, full_params, lora_settings, new_adapters
from sgm_jax.checkpointing.workdirs import read_workdir_config
from sgm_jax.diffusion.guiders import VanillaCFG
from sgm_jax.engine import DiffusionEngine, build_engine
from sgm_jax.errors import UserError
from sgm_jax.model_inputs import ConditioningValues, embedder_input_keys, example_batch, get_batch
from sgm_jax.nn.conditioner import (CLASS_EMBEDDER_CLASSES, get_unconditional_conditioning, text_tokenizers,
                                    tokenize_batch)
from sgm_jax.parallel import make_mesh, replicated

from .pipeline import SampleResult
from .runner import SamplingRunner, StepEvent
from .sampling import SAMPLER_DEFAULTS, SamplerSpec, canonical_sampler_name, make_discretization, seed_key

AS_TRAINED = "config"  # inference.discretization of a workdir: the training config's own schedule


def inference_defaults(engine: DiffusionEngine, image_shape: Sequence[int]) -> dict[str, Any]:
    """The `inference` section a workdir's config gets (what configs/inference/* hold for SDXL):
    the training config's sampler, steps and CFG scale; overridable with --config.inference.x=y."""
    smp = engine.sampler
    guider = getattr(smp, "guider", None)
    return {
        "sampler": canonical_sampler_name(type(smp).__name__) if smp is not None else "euler_edm",
        "num_steps": int(getattr(smp, "num_steps", None) or 50),
        "discretization": AS_TRAINED,
        "cfg_scale": float(guider.scale) if isinstance(guider, VanillaCFG) else 1.0,
        "height": int(image_shape[0]), "width": int(image_shape[1]),
        "num_samples": 1, "seed": 42,
        "batch_per_device": 64,
    }


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


class TrainedModel:
    """A train.py workdir ready to sample (weights on a data-parallel mesh, compiled once)."""

    def __init__(self, workdir: str | Path, config: Any, engine: DiffusionEngine, params: Any, step: int,
                 image_shape: tuple[int, ...], mesh: jax.sharding.Mesh | None = None, clip_tokenizer: Any = None,
                 step_progress: bool | None = None) -> None:
        self.workdir, self.config, self.engine, self.step = Path(workdir), config, engine, step
        self.image_shape = tuple(image_shape)
        self.name = self.workdir.name
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.local_devices())
        self.params = jax.device_put(params, replicated(self.mesh))
        self.inference = dict(config.get("inference") or {})
        self.runner = SamplingRunner(engine, self.mesh, self.name, step_progress)
        self.timings = self.runner.timings
        specs = [s for s in engine.conditioner.specs if s.input_key in ("cls", "txt")]
        self.condition_key: str | None = specs[0].input_key if specs else None
        self.n_classes = (int(specs[0].params.get("n_classes", CLASS_EMBEDDER_CLASSES)) if self.condition_key == "cls"
                          else None)
        self.zero_uc_keys = tuple(s.input_key for s in engine.conditioner.specs if s.ucg_rate > 0 and s.input_key)
        self._tokenizers = text_tokenizers(engine.conditioner, clip_tokenizer) if self.condition_key == "txt" else None
        self._encode: Callable = jax.jit(lambda p, b, bu: get_unconditional_conditioning(
            engine.conditioner, p, b, bu, force_uc_zero_embeddings=self.zero_uc_keys))

    @classmethod
    def load(cls, workdir: str | Path, *, use_ema: bool = True, step: int | None = None, config: Any = None,
             **kw: Any) -> "TrainedModel":
        """config: the workdir's config.json with --config overrides applied (read_workdir_config
        + sgm_jax.cli.configs.apply_overrides); None reads it as saved. kw: mesh, clip_tokenizer,
        step_progress."""
        workdir = Path(workdir)
        config = config if config is not None else with_inference_section(workdir, read_workdir_config(workdir))
        engine = build_engine(config.model, dtype=config.get("training", {}).get("dtype", "float32"))
        image_shape = workdir_image_shape(workdir)
        step, params = restore_weights(workdir, engine, image_shape, use_ema, step, config)
        return cls(workdir, config, engine, params, step, image_shape, **kw)

    @property
    def conditional(self) -> bool:
        return self.condition_key is not None

    def default_spec(self) -> SamplerSpec:
        return self.spec()

    def spec(self, sampler: str | None = None, steps: int | None = None, discretization: str | None = None,
             **options: Any) -> SamplerSpec:
        """SamplerSpec from the inference section; the trained sampler's own options and schedule
        unless another sampler / discretization is named."""
        inf = self.inference
        name = canonical_sampler_name(sampler or inf["sampler"])
        disc_name = discretization or inf["discretization"]
        trained = self.engine.sampler
        if disc_name == AS_TRAINED:
            disc = trained.discretization if trained is not None else make_discretization("edm")
        else:
            disc = make_discretization(disc_name)
        if trained is not None and canonical_sampler_name(type(trained).__name__) == name:
            options = {**{k: getattr(trained, k) for k in SAMPLER_DEFAULTS[name] if hasattr(trained, k)}, **options}
        return SamplerSpec.create(name, int(steps or inf["num_steps"]), disc, guided=self.conditional, **options)

    def check_conditions(self, conditions: Sequence[Any]) -> list[Any]:
        if not self.conditional:
            if any(c not in (None, "") for c in conditions):
                raise UserError(f"the model in {self.workdir} is unconditional: it takes no classes or prompts")
            return [None]
        if not conditions:
            raise UserError(f"the model in {self.workdir} is conditioned on "
                            f"{'classes' if self.condition_key == 'cls' else 'prompts'}: give at least one")
        if self.condition_key == "cls":
            out = []
            for c in conditions:
                if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
                    raise UserError(f"class {c!r} is not an integer")
                c = int(c)
                if not 0 <= c < int(self.n_classes):  # type: ignore[arg-type]
                    raise UserError(f"class {c} out of range: this model has {self.n_classes} classes (0..."
                                    f"{int(self.n_classes) - 1})")  # type: ignore[arg-type]
                out.append(c)
            return out
        return [str(c) for c in conditions]

    def condition(self, condition: Any, negative_prompt: str = "") -> tuple[dict, dict]:
        """c, uc (batch 1) for one class id / prompt (uc: the embeddings zeroed as in training's ucg).
        Size and crop inputs (SDXL's micro-conditioning) take the seed's sampling values: original
        = target = the trained image size, crop (0, 0)."""
        keys = [k for k in embedder_input_keys(self.engine.conditioner) if k != "cls"]
        h, w = self.image_shape[:2]
        prompt = str(condition) if self.condition_key == "txt" else ""
        batch, batch_uc = get_batch(keys, ConditioningValues.for_size(prompt, negative_prompt, w, h), 1)
        if self.condition_key == "cls":
            batch["cls"] = batch_uc["cls"] = np.asarray([condition], np.int32)
        elif self.condition_key == "txt":
            batch = tokenize_batch(self.engine.conditioner, batch, self._tokenizers)
            batch_uc = tokenize_batch(self.engine.conditioner, batch_uc, self._tokenizers)
        return self._encode(self.params.get("conditioner", {}), batch, batch_uc)

    def batch_size(self, total: int) -> int:
        """Images per compiled call for a request of `total`: inference.batch_per_device per device."""
        return min(int(self.inference["batch_per_device"]) * self.mesh.size, total)

    def sample(self, conditions: Sequence[Any] = (), *, num: int = 1, seed: int = 42, spec: SamplerSpec | None = None,
               cfg_scale: float | None = None, negative_prompt: str = "", batch_size: int | None = None,
               progress: Callable[[StepEvent], None] | None = None, start: int = 0,
               count: int | None = None) -> SampleResult:
        """`num` images per condition, condition-major: uint8 [len(conditions) * num, H, W, C].

        Image i's noise depends on (seed, i) only; batch_size: images per compiled call
        (default `batch_size(total)`). start / count: only images start ... start + count - 1 of
        the request (start a multiple of the batch size), the same pixels, for long requests."""
        conditions = self.check_conditions(conditions)
        total = len(conditions) * num
        count = total - start if count is None else min(count, total - start)
        rows = np.arange(start, start + count) // num  # the condition of each image asked for
        used = sorted(set(rows.tolist()))
        encoded = {i: self.condition(conditions[i], negative_prompt) for i in used}
        c, uc = (jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[np.searchsorted(used, rows)],
                                        *[encoded[i][k] for i in used]) for k in (0, 1))
        spec = spec or self.default_spec()
        scale = float(self.inference["cfg_scale"] if cfg_scale is None else cfg_scale)
        latent = tuple(self.engine.latent_shape((1,) + self.image_shape))[1:]
        images = self.runner.run(self.params, spec, c, uc, num=count, latent_shape=latent, cfg_scale=scale,
                                 seed_key=seed_key(seed), batch_size=batch_size or self.batch_size(total),
                                 progress=progress, first_index=start)
        captions = [str(conditions[i]) for i in rows] if self.conditional else []
        return SampleResult(images=images, latents=np.empty((0,), np.float32), sigmas={self.name: spec.sigmas()},
                            captions=captions)


def workdir_image_shape(workdir: Path) -> tuple[int, ...]:
    run = Path(workdir) / "run.json"
    shape = json.loads(run.read_text()).get("image_shape") if run.is_file() else None
    if not shape:
        raise FileNotFoundError(f"{run} (written by train.py, it records the image shape) is missing or empty")
    return tuple(int(x) for x in shape)


def with_inference_section(workdir: Path, config: ConfigDict) -> ConfigDict:
    """The workdir config with an `inference` section (its own sampler defaults) when it has none."""
    if "inference" not in config:
        engine = build_engine(config.model)
        config.inference = inference_defaults(engine, workdir_image_shape(workdir))
    return config


# --- one-call helpers (tests, benchmarks, evaluate.py) ----------------------------------------


def load_trained(workdir: str | Path, use_ema: bool = True, step: int | None = None):
    """(config, engine, params, run_info) of a training run (weights only; EMA when asked and present)."""
    workdir = Path(workdir)
    config = read_workdir_config(workdir)
    engine = build_engine(config.model, dtype=config.get("training", {}).get("dtype", "float32"))
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
