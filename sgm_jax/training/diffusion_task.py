"""The Task for the seed's DiffusionEngine: optimiser, EMA, the jitted loss/update, sample grids."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import multihost
from sgm_jax.batch_keys import SIZE_KEYS, is_stored_output
from sgm_jax.checkpointing.frozen import (
    abstract_full_params,
    floating_as,
    merge_params,
    split_params,
)
from sgm_jax.checkpointing.lora_params import (
    frozen_parts,
    full_params,
    lora_settings,
    new_adapters,
)
from sgm_jax.diffusion.registry import to_plain
from sgm_jax.engine import DiffusionEngine, build_engine
from sgm_jax.evaluation.in_training import make_training_evaluator
from sgm_jax.images import legible_scale, make_grid
from sgm_jax.model_inputs import ConditioningValues, get_batch
from sgm_jax.nn.conditioner import text_tokenizers, tokenize_batch
from sgm_jax.optim import make_optimizer

from .schedules import learning_rate_schedule
from .state import TrainState, trainable_tree
from .step import init_train_state, make_train_step
from .task import Task


def make_sample_fn(engine: DiffusionEngine, latent_shape: tuple[int, ...], sampler: Any = None):
    """jit: (params, cond_batch, key) -> images [N, H, W, C]; uc zeroes the ucg'd embeddings, as the seed."""
    ucg_keys = tuple(s.input_key for s in engine.conditioner.specs if s.ucg_rate > 0 and s.input_key)

    @jax.jit
    def sample(params, batch, key):
        noise_key, sampler_key = jax.random.split(key)
        cond = engine.condition(params, batch)
        uc = engine.condition(params, batch, force_zero_embeddings=ucg_keys)
        noise = jax.random.normal(noise_key, latent_shape, jnp.float32)
        return engine.sample(params, cond, uc, noise, key=sampler_key, sampler=sampler)

    return sample


def grid_batch(engine: DiffusionEngine, dataset: Any, tc: Any, n: int | None = None
               ) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The fixed conditioning of n samples (sample grids: training.num_samples; evaluation) and
    the text under each tile.

    `training.sample_classes` / `training.sample_prompts` (cycled to n) say what a grid shows;
    otherwise the first examples of the data set condition it.
    """
    n = int(tc.num_samples if n is None else n)
    # from pre-encoded data: the inputs only, so prompts below condition the grid through the frozen towers
    batch = {k: v[:n] for k, v in dataset.example_batch(n).items() if not is_stored_output(k)}
    reads = {s.input_key for s in engine.conditioner.specs}
    labels = None
    if tc.sample_classes and "cls" in reads:
        batch["cls"] = np.resize(np.asarray(tc.sample_classes, np.int32), n)
    if tc.sample_prompts and "txt" in reads:
        batch["txt"] = np.resize(np.asarray(list(tc.sample_prompts), dtype=object), n)
    # SDXL micro-conditioning as the seed's demo: original = target = the generated size, no crop;
    # int32 as the training batches carry them
    h, w = dataset.image_shape[:2]
    sizes, _ = get_batch([k for k in SIZE_KEYS if k in reads], ConditioningValues.for_size("", "", w, h), n)
    batch.update({k: v.astype(np.int32) for k, v in sizes.items()})
    if "cls" in reads and "cls" in batch:
        labels = [str(int(c)) for c in batch["cls"]]
    elif "txt" in reads and "txt" in batch:
        labels = [str(t) for t in batch["txt"]]
    return batch, labels


class DiffusionTask(Task):
    """Trains a DiffusionEngine config: the UNet and the is_trainable embedders; the first stage
    and frozen embedders (frozen.py) ride along as `frozen`, outside checkpoints and the optimiser."""

    name = "diffusion"
    accumulates_gradients = True  # training.grad_accum: the loop feeds k stacked micro-batches (step.py)

    def __init__(self, config: Any, dataset: Any, tokenizer: Any = None):
        """tokenizer: the CLIP tokenizer (default: load_tokenizer(training.tokenizer)), or a stand-in
        when only shapes matter (sgm_jax.aot's compile check)."""
        super().__init__(config, dataset)
        tc = config.training
        self.engine = build_engine(config.model, dtype=tc.dtype)
        if str(tc.frozen_dtype) not in ("float32", "bfloat16"):
            raise ValueError(f"training.frozen_dtype must be float32 or bfloat16, got {tc.frozen_dtype!r}")
        self.frozen_dtype = str(tc.frozen_dtype)  # the frozen parts on the devices
        mp = config.model.params
        self.ema_rate = float(mp.get("ema_decay_rate", 0.9999)) if mp.get("use_ema", False) else None
        self.grad_accum = int(tc.grad_accum)
        self.lora = lora_settings(config)  # None: the UNet (+ trainable embedders) train; else adapters only
        self._tokenizers = None
        if any(spec.is_text for spec in self.engine.conditioner.specs):
            # transformers is heavy and, without torch, prints a line on import: only text models need it
            from sgm_jax.nn.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tc.tokenizer or None) if tokenizer is None else tokenizer
            self._tokenizers = text_tokenizers(self.engine.conditioner, tokenizer)
        self._tx = None
        self._loaded: tuple[dict | None, dict] | None = None
        self.frozen: Any = None  # device copy, set by frozen_params()
        self._sample_fn = None
        self._grid: tuple[dict[str, np.ndarray], list[str] | None] | None = None
        self._grid_compiled = False  # several hosts: the grid sampler was compiled on all of them together
        self._evaluator = None
        if int(tc.eval_every) > 0 and config.get("eval") is not None:
            self._evaluator = make_training_evaluator({**to_plain(config.eval), "every": int(tc.eval_every)},
                                                      tuple(dataset.image_shape))

    # --- host side --------------------------------------------------------------------------
    def prepare_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Captions -> token ids (the jitted step never sees strings); other non-numeric fields dropped."""
        if self._tokenizers is not None:
            batch = tokenize_batch(self.engine.conditioner, batch, self._tokenizers)
        return {k: v for k, v in batch.items() if isinstance(v, (np.ndarray, jax.Array))
                and np.asarray(v).dtype.kind in "biuf"}

    def _load(self, example: Mapping[str, Any]) -> tuple[dict | None, dict]:
        if self._loaded is None:
            trainable, frozen = frozen_parts(self.engine, self.config, abstract_full_params(self.engine, example),
                                             example, self.lora)
            self._loaded = trainable, floating_as(frozen, self.frozen_dtype) if frozen else frozen
        return self._loaded

    def initial_params(self, example: Mapping[str, Any]) -> dict | None:
        """The trainable params a fine-tune starts from (model.params.ckpt_path), or None (random)."""
        return self._load(example)[0]

    def frozen_params(self, example: Mapping[str, Any], place: Any) -> Any:
        """The frozen parts, placed on the devices by `place(tree)` (the loop's shardings)."""
        frozen = self._load(example)[1]
        self.frozen = place(frozen) if frozen else None
        return self.frozen

    def frozen_shapes(self, example: Mapping[str, Any]) -> Any:
        """The first stage and frozen embedders, or with LoRA the whole engine as the adapters' base."""
        trainable, frozen = split_params(self.engine, abstract_full_params(self.engine, example))
        if self.lora is not None:
            frozen = merge_params(trainable, frozen)
        return floating_as(frozen, self.frozen_dtype) if frozen else None

    # --- state and step ----------------------------------------------------------------------
    def _optimizer(self, params: Any):
        if self._tx is None:
            tc, mp = self.config.training, self.config.model.params
            lr = learning_rate_schedule(float(self.config.model.base_learning_rate), mp.get("scheduler_config"),
                                        int(tc.warmup_steps))
            trainable = (jax.tree_util.tree_map(lambda _: True, params) if self.lora is not None
                         else trainable_tree(self.engine.conditioner, params))
            self._tx = make_optimizer(lr, trainable, optimizer_config=mp.get("optimizer_config"),
                                      grad_clip=float(tc.grad_clip))
        return self._tx

    def init_state_from(self, trainable: Any) -> TrainState:
        return init_train_state(trainable, self._optimizer(trainable), self.ema_rate is not None)

    def init_state(self, key: jax.Array, example_batch: Mapping[str, Any]) -> TrainState:
        full = self.engine.init_params(key, example_batch)
        if self.lora is not None:  # only the base's shapes are read: its random values are never used
            return self.init_state_from(new_adapters(full, self.lora, jax.random.fold_in(key, 1)))
        return self.init_state_from(split_params(self.engine, full)[0])

    def _full_params(self, trainable: Any, frozen: Any) -> Any:
        return full_params(self.lora, trainable, frozen)

    def train_step(self, state: TrainState, batch: Mapping[str, Any], key: jax.Array, frozen: Any = None):
        step = make_train_step(self.engine, self._optimizer(state.params), ema_rate=self.ema_rate,
                               full_params=self._full_params, grad_accum=self.grad_accum)
        return step(state, batch, key, frozen)

    def sampling_params(self, state: TrainState) -> Any:
        trained = state.ema_params if state.ema_params is not None else state.params
        return self._full_params(trained, self.frozen)

    def log_images(self, state: TrainState, step: int) -> dict[str, Any]:
        if self.engine.sampler is None:
            return {}
        tc = self.config.training
        if self._grid is None:
            batch, labels = grid_batch(self.engine, self.dataset, tc)
            self._grid = (self.prepare_batch(batch), labels)
            shape = (int(tc.num_samples),) + tuple(self.dataset.image_shape)
            self._sample_fn = make_sample_fn(self.engine, self.engine.latent_shape(shape))
        batch, labels = self._grid
        args = (self.sampling_params(state), batch, jax.random.key(int(tc.seed) + 7))
        if not self._grid_compiled and jax.process_count() > 1:
            multihost.compile_together(self._sample_fn, *args, name="grid")
            self._grid_compiled = True
        images = multihost.to_host(self._sample_fn(*args))
        return {"": make_grid(np.asarray(images), int(tc.sample_nrow), labels,
                              scale=legible_scale(images.shape[1]))}

    def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
        """config.eval's metrics (FID, classifier accuracy, CLIP score) on samples of the current
        weights, conditioned on sample_classes / sample_prompts cycled (sgm_jax.evaluation)."""
        if self._evaluator is None:
            return {}
        tc, params = self.config.training, self.sampling_params(state)
        chunk = int(self.config.eval.get("batch_size", 64))
        sample = make_sample_fn(self.engine, self.engine.latent_shape((chunk,) + tuple(self.dataset.image_shape)))

        def generate(n: int, seed: int):
            batch, _ = grid_batch(self.engine, self.dataset, tc, n)
            conditioning = ([int(c) for c in batch["cls"]] if "cls" in batch else
                            [str(t) for t in batch["txt"]] if "txt" in batch else None)
            batch = self.prepare_batch(batch)
            images = []
            for start in range(0, n, chunk):
                part = {k: np.resize(v[start:start + chunk], (chunk,) + v.shape[1:]) for k, v in batch.items()}
                images.append(multihost.to_host(sample(params, part, jax.random.fold_in(jax.random.key(seed), start))))
            return np.concatenate(images)[:n], conditioning

        return self._evaluator(generate, step)
