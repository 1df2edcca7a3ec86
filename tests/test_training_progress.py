"""What a run shows and counts: metrics.jsonl after a rerun from scratch, the first skipped update,
the progress bar of a time-budgeted run, gradient accumulation counted in optimiser steps.

Real runs of tests/test_training.py's tiny_config, a few steps each; one compiled step per module
(train's `run`), as only training's stopping and logging fields differ between the runs.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.errors import UserError
from sgm_jax.checkpointing.checkpoint import Checkpointer, step_dirs
from sgm_jax.training.loop import build_run, guarded, train
from sgm_jax.training.progress import NonfiniteWatch
from sgm_jax.training.state import TrainState
from test_training import tiny_config


@pytest.fixture(scope="module")
def run():
    return build_run(tiny_config())


def _steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_rerun_from_scratch_replaces_the_rows_of_the_killed_run(tmp_path, run):
    workdir = tmp_path / "run"
    train(tiny_config(max_steps=2, log_every=1), workdir, run=run)
    assert _steps(workdir) == [1, 2]
    # the first save was killed: only Orbax's temp folder is left, the rerun starts at step 0
    ckpts = workdir / "checkpoints"
    (ckpts / "2").rename(ckpts / "2.orbax-checkpoint-tmp-1234")
    summary = train(tiny_config(max_steps=3, log_every=1), workdir, run=run)
    assert summary["step"] == 3
    assert _steps(workdir) == [1, 2, 3]


def test_the_first_skipped_update_is_one_warning_line_naming_step_and_cause(tmp_path, capsys):
    config = tiny_config(max_steps=8, log_every=2, max_nonfinite_steps=20)
    config.model.base_learning_rate = 1e8  # the first update blows the weights up: every later one is skipped
    train(config, tmp_path / "run")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out  # one line for the streak, not one per log step
    assert warnings[0].startswith("warning: step 2: gradient not finite, update skipped"), warnings
    assert "training.max_nonfinite_steps=20" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["nonfinite_steps"] for r in rows) == 7


@pytest.mark.parametrize("bad, named", [("grad_norm", "gradient"), ("loss", "loss")])
def test_the_warning_names_what_was_not_finite(bad, named):
    def train_step(state, batch, key):
        metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}
        return state, {**metrics, bad: jnp.float32(jnp.nan)}

    step = jax.jit(guarded(train_step))
    state = TrainState(step=jnp.int32(4), params={"w": jnp.ones(2)}, opt_state=())
    carry = jnp.zeros((3,), jnp.int32)
    for _ in range(3):
        state, _, carry = step(state, {}, jax.random.key(0), carry, None)
    lines = []
    watch = NonfiniteWatch(5, lambda: None, lines.append, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    carry = watch.check(carry, 7)
    assert lines == [f"warning: step 5: {named} not finite, update skipped (3 skipped in a row at step 7; the run "
                     "stops after training.max_nonfinite_steps=5); lower model.base_learning_rate or set "
                     "training.grad_clip if this repeats"]
    watch.check(carry, 7)  # reported once
    assert len(lines) == 1


def test_a_time_budgeted_run_shows_elapsed_over_budget_and_no_step_total(tmp_path, run, capsys):
    summary = train(tiny_config(max_steps=37500, max_minutes=0.05, log_every=1), tmp_path / "run", run=run)
    assert summary["stopped_by"] == "max_minutes"
    err = capsys.readouterr().err
    assert "/ 00:03 budget" in err and f"step {summary['step']}" in err, err
    assert "37500" not in err, err


def test_gradient_accumulation_counts_optimiser_steps_and_resumes_exactly(tmp_path):
    accum = build_run(tiny_config(grad_accum=2))
    config = lambda **t: tiny_config(grad_accum=2, log_every=1, **t)  # noqa: E731
    full = train(config(max_steps=3, checkpoint_every=2), tmp_path / "full", run=accum)
    assert full["step"] == 3 and _steps(tmp_path / "full") == [1, 2, 3]
    assert step_dirs(tmp_path / "full" / "checkpoints") == [3, 2]
    # checkpoint 2 holds the data position after 2 x 2 micro-batches
    ckpt = Checkpointer(tmp_path / "full" / "checkpoints")
    state, data = ckpt.restore_step(2, accum.abstract_with_sharding())
    ckpt.close()
    assert int(state.step) == 2 and data["hosts"] == [{"step": 4}]

    # stopped at 2 and resumed: the same micro-batches, the same weights as the uninterrupted run
    train(config(max_steps=2), tmp_path / "resumed", run=accum)
    train(config(max_steps=3), tmp_path / "resumed", run=accum)
    final = [Checkpointer(tmp_path / d / "checkpoints") for d in ("full", "resumed")]
    (a, _), (b, _) = (c.restore_step(3, accum.abstract_with_sharding()) for c in final)
    for c in final:
        c.close()
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("config_name, accum, says", [
    ("autoencoder_mnist", 2, "the autoencoder task has no gradient accumulation; set --config.training.grad_accum=1"),
    ("mnist_cond", 0, "training.grad_accum=0: must be 1 (no accumulation) or more")])
def test_a_grad_accum_the_task_cannot_use_is_one_line(config_name, accum, says):
    import importlib

    config = importlib.import_module(f"sgm_jax.configs.{config_name}").get_config()
    config.training.grad_accum = accum
    with pytest.raises(UserError, match=re.escape(says)) as info:
        build_run(config)
    assert "\n" not in str(info.value)
