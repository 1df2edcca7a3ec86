"""The training loop behind train.py, for every Task (task.py): data, sharded state, the jitted
and guarded step, checkpoints with the data position, logs, sample grids, signals.

`<workdir>` receives: config.json (the resolved config), run.json (image shape, data source),
checkpoints/<step>/ (Orbax), metrics.jsonl and tensorboard/ (event files), samples/*.png,
train.lock while a trainer runs. Nothing is created or overwritten before the config, the
data and (when resuming) the checkpoint have been checked against each other.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from sgm_jax import data, mesh_context, multihost, parallel
from sgm_jax.checkpointing.checkpoint import (
    Checkpointer,
    check_tree_matches,
    interrupted_saves,
    step_dirs,
)
from sgm_jax.errors import UserError
from sgm_jax.images import save_png
from sgm_jax.signals import StopFlag

from .metrics import MetricsWriter, truncate_after
from .progress import (
    CARRY_SHAPE,
    NonfiniteWatch,
    next_carry,
    nonfinite_what,
    progress_bar,
)
from .run_control import Profiler
from .tasks import task_class
from .workdir import WorkdirLock, check_run_record, write_json_atomic

REQUIRED_TRAINING_FIELDS = (
    "name", "seed", "max_steps", "max_epochs", "max_minutes", "checkpoint_every", "keep_checkpoints",
    "checkpoint_async", "sample_every", "num_samples", "sample_nrow", "sample_classes", "sample_prompts",
    "log_every", "eval_every", "dtype", "max_nonfinite_steps", "tokenizer", "report_flops", "profile_steps",
)


def _dataset(config: Any) -> Any:
    return data.from_config(config.data, split="train")


@dataclasses.dataclass
class Run:
    """Everything built from a config before any state exists (no files touched)."""

    config: Any
    task: Any
    dataset: Any
    mesh: Any
    batch_size: int
    abstract_state: Any
    state_sharding: Any
    init_fn: Callable  # key -> state (random initialisation)
    step_fn: Callable  # (state, batch, base_key, nonfinite, frozen) -> (state, metrics, nonfinite)
    example: dict
    prepare: Callable  # host batch -> what the step reads (e.g. captions -> token ids)
    grad_accum: int = 1  # micro-batches per optimiser step, fed to the step stacked

    def next_batch(self, batches: Any) -> dict:
        """One step's global batch from the data iterator: `grad_accum` micro-batches [k, B, ...]
        when accumulating (the iterator's position then counts micro-batches exactly)."""
        if self.grad_accum == 1:
            return parallel.shard_batch(self.prepare(next(batches)), self.mesh)
        micro = [self.prepare(next(batches)) for _ in range(self.grad_accum)]
        return parallel.shard_batch({k: np.stack([m[k] for m in micro]) for k in micro[0]}, self.mesh, stacked=True)

    def nonfinite_start(self) -> jax.Array:
        """The guarded step's skipped-update carry at the start (progress.py), placed as the step returns it."""
        return jax.device_put(jnp.zeros(CARRY_SHAPE, jnp.int32), parallel.replicated(self.mesh))

    def initial_state(self, seed: int) -> Any:
        """A fresh state: the task's pretrained starting point when it has one, else random."""
        initial = self.task.initial_params(self.example)
        if initial is None:
            return self.init_fn(jax.random.key(seed))
        shardings = parallel.param_shardings(initial, self.mesh)
        return jax.jit(self.task.init_state_from, out_shardings=self.state_sharding)(
            jax.device_put(initial, shardings))

    def frozen(self) -> Any:
        """The task's frozen parts on the devices (FSDP-sharded like the params), or None."""
        place = lambda tree: jax.device_put(tree, parallel.param_shardings(tree, self.mesh))  # noqa: E731
        return self.task.frozen_params(self.example, place)

    def abstract_with_sharding(self) -> Any:
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      self.abstract_state, self.state_sharding)


def guarded(train_step: Callable) -> Callable:
    """Wrap a task's step: per-step key, and an update whose loss or gradient norm is not finite
    is skipped (state kept, step counted); `nonfinite` (progress.py's carry) counts such steps in
    a row and remembers the first one and what was not finite. `frozen` (None when the task has
    no frozen parts) is passed through to the task's step."""

    def finite(metrics: dict, name: str) -> jax.Array:
        return jnp.all(jnp.isfinite(metrics[name])) if name in metrics else jnp.bool_(True)

    def step(state, batch, base_key, nonfinite, frozen):
        key = jax.random.fold_in(base_key, state.step)
        # a bare step function (state, batch, key) works too: frozen is passed only when there is one
        new, metrics = train_step(state, batch, key) if frozen is None else train_step(state, batch, key, frozen)
        loss_ok, grad_ok = finite(metrics, "loss"), finite(metrics, "grad_norm")
        ok = loss_ok & grad_ok
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
        new = new.replace(step=state.step + 1)
        metrics = {**metrics, "nonfinite": 1 - ok.astype(jnp.int32)}
        return new, metrics, next_carry(nonfinite, ok, nonfinite_what(loss_ok, grad_ok), state.step + 1)

    return step


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_training_config(tc: Any) -> None:
    missing = [f for f in REQUIRED_TRAINING_FIELDS if f not in tc]
    if missing:
        raise UserError(f"config.training lacks {', '.join(missing)} (start from "
                        "sgm_jax.configs.training_defaults.training(), which holds every default)")


def build_run(config: Any, *, dataset: Any = None, task: Any = None, devices: Any = None) -> Run:
    """Task, dataset, mesh, shardings and the jitted step from a config. No state, no files.

    dataset / task / devices: given by the caller instead of built from the config and
    jax.devices() (sgm_jax.aot's compile check: stand-in data, a TPU slice's compile-only devices)."""
    check_training_config(config.training)
    cls = task_class(config.model.target) if task is None else type(task)
    grad_accum = int(config.training.grad_accum)
    if grad_accum < 1:
        raise UserError(f"training.grad_accum={grad_accum}: must be 1 (no accumulation) or more")
    if grad_accum > 1 and not cls.accumulates_gradients:
        raise UserError(f"training.grad_accum={grad_accum}: the {cls.name} task has no gradient accumulation; "
                        "set --config.training.grad_accum=1 and a larger data.params.batch_size")
    dataset = _dataset(config) if dataset is None else dataset
    task = cls(config, dataset) if task is None else task
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    batch_size = int(dataset.batch_size)
    parallel.global_batch_size_check(batch_size, mesh)
    prepare = task.prepare_batch
    example = prepare({k: v[:2] for k, v in dataset.example_batch(2).items()})
    # traced on the mesh: layers choose their per-device form from it (nn.attention's TPU kernel)
    init = mesh_context.traced_on(mesh, lambda key: task.init_state(key, example))
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    state_sharding = parallel.param_shardings(abstract_state, mesh)
    repl = parallel.replicated(mesh)
    # the frozen tree keeps the shardings it was placed with (in_shardings None)
    batch_sharding = parallel.stacked_batch_sharding(mesh) if grad_accum > 1 else parallel.batch_sharding(mesh)
    step_fn = jax.jit(mesh_context.traced_on(mesh, guarded(task.train_step)),
                      in_shardings=(state_sharding, batch_sharding, repl, repl, None),
                      out_shardings=(state_sharding, repl, repl), donate_argnums=0,
                      compiler_options=parallel.compiler_options(config.mesh, mesh))
    return Run(config, task, dataset, mesh, batch_size, abstract_state, state_sharding,
               jax.jit(init, out_shardings=state_sharding), step_fn, example, prepare, grad_accum)


def step_flops(lowered: Any) -> float | None:
    """FLOPs of one train step (XLA's cost analysis of the lowered step, all devices together)."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
    except Exception:  # not every backend / JAX version reports costs: the metric is then left out
        return None


def _config_text(config: Any) -> str:
    return config.to_json_best_effort(indent=2) if isinstance(config, ConfigDict) else json.dumps(config)


def train(config: Any, workdir: str | Path, run: Run | None = None) -> dict[str, Any]:
    """Train until max_steps / max_epochs / max_minutes, SIGTERM or Ctrl-C; resumes from the newest
    checkpoint that restores. Raises UserError (one line) for bad input and for divergence.

    `run`: a Run built earlier from a config that differs from this one in `training` stopping
    and logging fields at most (benchmarks and tests: the compiled step is reused)."""
    workdir = Path(workdir)
    is_main = multihost.is_main()
    run = build_run(config) if run is None else dataclasses.replace(run, config=config)
    ckpt_dir = workdir / "checkpoints"
    existing = step_dirs(ckpt_dir)
    if existing:  # the checkpoint must belong to this model before anything is written
        check_tree_matches(ckpt_dir / str(existing[0]), run.abstract_state)
    data_description = run.dataset.source.describe() if run.dataset.source else ""
    check_run_record(workdir, data_description, run.dataset.source.file_stamps() if run.dataset.source else None,
                     bool(config.data.get("allow_changed_shards", False)))

    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir, jax.process_index())
    problem = lock.acquire()
    if multihost.agree_max([problem is not None])[0]:  # every host stops, not only the one refused
        lock.release()
        raise UserError(problem or f"{workdir} is in use by another training (another host of this job was "
                                   "refused its lock); wait for it to finish or choose another --workdir")
    with lock:
        unfinished = interrupted_saves(ckpt_dir) if is_main else []  # the Checkpointer's Orbax manager removes them
        if unfinished:
            print(f"removing {len(unfinished)} unfinished checkpoint save(s): {', '.join(p.name for p in unfinished)}")
        multihost.sync("sgm_jax:workdir_ready")
        return _train_locked(run, workdir, is_main, data_description)


def _train_locked(run: Run, workdir: Path, is_main: bool, data_description: str) -> dict[str, Any]:
    config, tc, task, dataset = run.config, run.config.training, run.task, run.dataset
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=int(tc.keep_checkpoints),
                                async_save=bool(tc.checkpoint_async))
    frozen = run.frozen()
    restored_step, state, data_state = checkpointer.restore_latest(run.abstract_with_sharding())
    if restored_step is None:
        state = run.initial_state(int(tc.seed))
    start = int(jax.device_get(state.step))
    if is_main:
        write_json_atomic(workdir / "config.json", _config_text(config))
        write_json_atomic(workdir / "run.json", {"image_shape": list(dataset.image_shape), "data": data_description,
                                                 "task": task.name,
                                                 "shards": dataset.source.file_stamps() if dataset.source else {}})
        # rows after the step this run starts from are replayed: a rerun from scratch (a first save
        # that was killed) drops them all, or metrics.jsonl would hold steps 1, 2, 1, 2, 3
        truncate_after(workdir / "metrics.jsonl", start)
        if restored_step is not None:
            print(f"resumed from {checkpointer.directory}/{restored_step}")
    k = run.grad_accum  # micro-batches per step: the data stream counts those
    batches = dataset.iterator(run.batch_size, int(tc.seed), start_step=start * k)
    if data_state and data_state.get("hosts"):
        hosts = data_state["hosts"]
        if len(hosts) != jax.process_count():
            raise UserError(f"checkpoint {restored_step} was written by {len(hosts)} hosts, this run has "
                            f"{jax.process_count()}: the data position cannot be restored")
        batches.set_state(hosts[jax.process_index()])

    micro_per_epoch = dataset.steps_per_epoch(run.batch_size)
    max_steps = int(tc.max_steps)  # optimiser steps, as the seed's global_step
    if max_steps <= 0:
        if not micro_per_epoch:
            raise UserError("a streaming data set has no epochs: set training.max_steps")
        max_steps = int(tc.max_epochs) * micro_per_epoch // k
    max_seconds = float(tc.max_minutes) * 60.0
    base_key = jax.random.fold_in(jax.random.key(int(tc.seed)), 1)
    nonfinite = run.nonfinite_start()
    finite_fn = jax.jit(all_finite)

    def write_grids(state_: Any, step: int) -> str | None:
        grids = task.log_images(state_, step)
        paths = []
        if is_main:
            for name, image in grids.items():
                fname = f"{name + '_' if name else ''}step_{step:07d}.png"
                paths.append(str(save_png(image, workdir / "samples" / fname, {"step": str(step), "config": tc.name})))
        return paths[0] if paths else None


    def save(state_: Any, step: int, force: bool = False) -> None:
        if not bool(jax.device_get(finite_fn(state_))):
            raise UserError(f"state at step {step} holds non-finite values: not saved (last checkpoint: "
                            f"{checkpointer.latest_step()}); lower model.base_learning_rate", exit_code=3)
        data = {"hosts": multihost.gather_json(batches.get_state())}
        checkpointer.save(step, state_, data, force=force)

    metrics = MetricsWriter(workdir, enabled=is_main)
    log_every, ckpt_every, sample_every = int(tc.log_every), int(tc.checkpoint_every), int(tc.sample_every)
    eval_every = int(tc.eval_every)
    profiler = Profiler(tc.profile_steps, workdir / "profile")
    flops = None
    t0 = last_t = time.time()
    last_step, loss_acc, n_acc, skipped = start, 0.0, 0, 0
    stopped_by, step = "max_steps", start
    bar = progress_bar(start, max_steps, max_seconds, is_main)
    watch = NonfiniteWatch(int(tc.max_nonfinite_steps), checkpointer.latest_step,
                           bar.write if is_main else lambda line: None, parallel.replicated(run.mesh))
    try:
        with StopFlag() as flag:
            for step in range(start, max_steps):
                batch = run.next_batch(batches)
                if step == start and (jax.process_count() > 1 or bool(tc.report_flops)):
                    lowered = run.step_fn.lower(state, batch, base_key, nonfinite, frozen)  # traced once
                    if jax.process_count() > 1:
                        multihost.start_together(lowered, name="train_step")
                    if bool(tc.report_flops):
                        flops = step_flops(lowered)
                profiler.before(step)
                state, m, nonfinite = run.step_fn(state, batch, base_key, nonfinite, frozen)
                profiler.after(step, m)
                loss_acc, n_acc, skipped = loss_acc + m["loss"], n_acc + 1, skipped + m["nonfinite"]
                done = step + 1
                bar.update(1)
                if done % log_every == 0 or done == max_steps:
                    nonfinite = watch.check(nonfinite, done)
                    now = time.time()
                    rate = (done - last_step) / max(now - last_t, 1e-9)
                    loss = float(loss_acc) / n_acc
                    row = {"loss": loss, "steps_per_sec": rate, "images_per_sec": rate * run.batch_size * k,
                           "nonfinite_steps": int(skipped), **{k: float(v) for k, v in m.items()
                                                               if k not in ("loss", "nonfinite")}}
                    if micro_per_epoch:
                        row["epoch"] = done * k / micro_per_epoch
                    if flops:  # achieved, per device (compare with the device's peak)
                        row["tflops_per_device"] = flops * rate / run.mesh.size / 1e12
                    row.update({f"data/{k}": v for k, v in batches.stats().items()})
                    metrics.write(done, row)
                    bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.2f}")
                    loss_acc, n_acc, skipped, last_t, last_step = 0.0, 0, 0, now, done
                # one collective a step (none on one host): a signal or the time budget that reached any
                # host stops every host after this same step
                signal_code, over_time = multihost.agree_max(
                    [StopFlag.code(flag.stop), bool(max_seconds and time.time() - t0 > max_seconds)])
                if signal_code:
                    stopped_by = StopFlag.name(signal_code)
                    break
                if done % ckpt_every == 0:
                    nonfinite = watch.check(nonfinite, done)
                    save(state, done)
                if sample_every > 0 and done % sample_every == 0:
                    write_grids(state, done)
                if eval_every > 0 and done % eval_every == 0:
                    metrics.write(done, {f"eval/{k}": v for k, v in task.evaluate(state, done).items()})
                if over_time:
                    stopped_by = "max_minutes"
                    break
        bar.close()
        watch.check(nonfinite, step + 1)
        final_step = int(jax.device_get(state.step))
        if checkpointer.latest_step() != final_step:
            save(state, final_step, force=True)
        checkpointer.close()
    finally:
        bar.close()
        metrics.close()
        batches.close()
    # after a signal the user wants the process gone: no final grid (nor with sample_every 0)
    grid = write_grids(state, final_step) if stopped_by in ("max_steps", "max_minutes") and sample_every > 0 else None
    summary = {"step": final_step, "stopped_by": stopped_by, "seconds": time.time() - t0, "samples": grid,
               "data": data_description}
    if is_main:
        print(json.dumps(summary))
    return summary
