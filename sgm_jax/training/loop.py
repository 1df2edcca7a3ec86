"""The training loop behind train.py: data, sharded state, jit step, checkpoints, logs, samples.

`<workdir>` receives: config.json (the resolved config), checkpoints/<step>/ (Orbax),
metrics.jsonl and tensorboard/ (event files), samples/step_<N>.png (labelled grids).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sgm_jax import parallel
from sgm_jax.data import build_dataset
from sgm_jax.engine import DiffusionEngine, build_engine

from .checkpoint import Checkpointer
from .images import make_grid, save_png
from .metrics import MetricsWriter
from .state import TrainState, make_optimizer, trainable_tree
from .step import init_train_state, make_train_step


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    node = cfg
    for part in path.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


class _StopFlag:
    """SIGTERM (preemption) -> finish the current step, save, exit cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, runs to the end
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_trainer(config: Any) -> dict[str, Any]:
    """Engine, dataset, mesh, optimiser and the jitted step, from a config. No state yet."""
    tc = config.training
    engine = build_engine(config.model, dtype=tc.get("dtype", "float32"))
    data_params = dict(config.data.get("params", {}))
    data_params["path"] = data_params.get("path") or None  # "" (overridable on the CLI) = search
    batch_size = int(data_params.get("batch_size", 64))
    dataset = build_dataset(config.data.target, split="train", **data_params)
    mesh = parallel.make_mesh(_get(config, "mesh.data", -1), _get(config, "mesh.fsdp", 1))
    parallel.global_batch_size_check(batch_size, mesh)
    example = {k: v[:2] for k, v in dataset.batch_at(0, batch_size, tc.seed).items()}
    abstract_params = jax.eval_shape(engine.init_params, jax.random.key(0), example)
    trainable = trainable_tree(engine.conditioner, abstract_params)
    tx = make_optimizer(float(config.model.base_learning_rate), trainable,
                        weight_decay=float(tc.get("weight_decay", 0.01)), grad_clip=float(tc.get("grad_clip", 0.0)),
                        grad_accum=int(tc.get("grad_accum", 1)), warmup_steps=int(tc.get("warmup_steps", 0)))
    use_ema = bool(_get(config, "model.params.use_ema", False))
    ema_rate = float(_get(config, "model.params.ema_decay_rate", 0.9999)) if use_ema else None

    def init_state(key: jax.Array) -> TrainState:
        return init_train_state(engine.init_params(key, example), tx, use_ema)

    abstract_state = jax.eval_shape(init_state, jax.random.key(0))
    state_sharding = parallel.param_shardings(abstract_state, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    repl = parallel.replicated(mesh)
    step_fn = jax.jit(make_train_step(engine, tx, ema_rate=ema_rate),
                      in_shardings=(state_sharding, batch_sharding, repl),
                      out_shardings=(state_sharding, repl), donate_argnums=0)
    init_fn = jax.jit(init_state, out_shardings=state_sharding)
    return dict(engine=engine, dataset=dataset, mesh=mesh, tx=tx, batch_size=batch_size, step_fn=step_fn,
                init_fn=init_fn, abstract_state=abstract_state, state_sharding=state_sharding)


def sample_grid_batch(engine: DiffusionEngine, dataset: Any, n: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed conditioning batch for sample grids: classes 0, 1, ..., 9, 0, ... when class-conditional."""
    batch = dataset.batch_at(0, max(n, 1), seed, shuffle=False)
    if "cls" in batch:
        batch["cls"] = (np.arange(n) % 10).astype(np.int32)
    return {k: v[:n] for k, v in batch.items()}


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


def write_samples(path: Path, images: np.ndarray, labels: np.ndarray | None, nrow: int,
                  metadata: Mapping[str, str]) -> Path:
    text = [str(int(c)) for c in labels] if labels is not None else None
    scale = 2 if images.shape[1] <= 64 else 1
    return save_png(make_grid(np.asarray(images), nrow, text, scale=scale), path, metadata)


def train(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Train until max_steps / max_epochs / max_minutes or SIGTERM. Resumes from the latest checkpoint."""
    parallel.initialize_distributed()
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
                                             else json.dumps(config, indent=2))
    tc = config.training
    t = build_trainer(config)
    engine, dataset, batch_size = t["engine"], t["dataset"], t["batch_size"]
    if is_main:
        (workdir / "run.json").write_text(json.dumps({"image_shape": list(dataset.image_shape),
                                                      "data": dataset.source.describe() if dataset.source else ""}))
    steps_per_epoch = dataset.steps_per_epoch(batch_size)
    max_steps = int(tc.get("max_steps", -1))
    if max_steps <= 0:
        max_steps = int(tc.get("max_epochs", 1)) * steps_per_epoch
    max_seconds = float(tc.get("max_minutes", 0) or 0) * 60.0

    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=int(tc.get("keep_checkpoints", 3)))
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t["abstract_state"], t["state_sharding"]))
        print(f"resumed from {checkpointer.directory}/{checkpointer.latest_step()}")
    else:
        state = t["init_fn"](jax.random.key(int(tc.seed)))
    base_key = jax.random.fold_in(jax.random.key(int(tc.seed)), 1)
    start = int(jax.device_get(state.step))

    n_samples = int(tc.get("num_samples", 16))
    grid_batch = sample_grid_batch(engine, dataset, n_samples, int(tc.seed))
    latent_shape = engine.latent_shape((n_samples,) + tuple(dataset.image_shape))
    sample_fn = make_sample_fn(engine, latent_shape) if engine.sampler is not None else None

    def log_samples(state_: TrainState, step: int) -> Path | None:
        if sample_fn is None or not is_main:
            return None
        params = state_.ema_params if state_.ema_params is not None else state_.params
        images = jax.device_get(sample_fn(params, grid_batch, jax.random.key(int(tc.seed) + 7)))
        return write_samples(workdir / "samples" / f"step_{step:07d}.png", images, grid_batch.get("cls"),
                             int(tc.get("sample_nrow", 4)), {"step": str(step), "config": str(tc.get("name", ""))})

    metrics = MetricsWriter(workdir, enabled=is_main)
    log_every, ckpt_every = int(tc.get("log_every", 50)), int(tc.get("checkpoint_every", 5000))
    sample_every = int(tc.get("sample_every", 1000))
    t0, last_t, last_step = time.time(), time.time(), start
    loss_acc, n_acc, step = 0.0, 0, start
    stopped_by = "max_steps"
    bar = tqdm(total=max_steps, initial=start, desc="train", disable=not is_main, dynamic_ncols=True)
    with _StopFlag() as flag:
        for step in range(start, max_steps):
            batch = parallel.shard_batch(dataset.batch_at(step, batch_size, int(tc.seed)), t["mesh"])
            state, m = t["step_fn"](state, batch, base_key)
            loss_acc, n_acc = loss_acc + m["loss"], n_acc + 1
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == max_steps:
                now = time.time()
                loss = float(loss_acc) / n_acc
                rate = (done - last_step) / max(now - last_t, 1e-9)
                metrics.write(done, {"loss": loss, "grad_norm": float(m["grad_norm"]), "steps_per_sec": rate,
                                     "epoch": done / steps_per_epoch})
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}")
                loss_acc, n_acc, last_t, last_step = 0.0, 0, now, done
            if done % ckpt_every == 0:
                checkpointer.save(done, state)
            if sample_every > 0 and done % sample_every == 0:
                log_samples(state, done)
            if flag.stop:
                stopped_by = "SIGTERM"
                break
            if max_seconds and time.time() - t0 > max_seconds:
                stopped_by = "max_minutes"
                break
    bar.close()
    final_step = int(jax.device_get(state.step))
    if checkpointer.latest_step() != final_step:
        checkpointer.save(final_step, state, force=True)
    checkpointer.close()
    grid = log_samples(state, final_step) if final_step > start or sample_fn is not None else None
    metrics.close()
    summary = {"step": final_step, "stopped_by": stopped_by, "seconds": time.time() - t0,
               "samples": str(grid) if grid else None, "data": dataset.source.describe() if dataset.source else ""}
    if is_main:
        print(json.dumps(summary))
    return summary
