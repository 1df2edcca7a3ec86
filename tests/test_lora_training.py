"""LoRA fine-tuning through train.py's loop: only adapters train and are checkpointed; the
exported kohya file, merged by the LoRA loader, reproduces what the trained run samples."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.convert.checkpoint import convert_file
from sgm_jax.convert.params_dir import load_params
from sgm_jax.inference.workdir import TrainedModel
from sgm_jax.lora import apply_loras
from sgm_jax.checkpointing.checkpoint import _read_metadata, restore_params
from sgm_jax.training.lora_training import export_workdir
from sgm_jax.training.loop import build_run, train
from test_inference import write_random_checkpoint
from test_training import tiny_config


def lora_config(base: str = "", **training):
    config = tiny_config(**training)
    config.model.params.network_config.params.attention_resolutions = (1,)  # attention to adapt
    config.model.base_learning_rate = 1e-2
    config.model.params.ckpt_path = base
    config.lora = {"rank": 2, "alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out_0", "proj_in",
                                                               "proj_out"]}
    return config


def pretrained_base(tmp_path) -> str:
    """A converted checkpoint of random seed-layout weights: unlike a fresh UNet (whose final
    conv and proj_outs are zero, the seed's zero_module), every layer passes gradients on."""
    config = lora_config()
    return str(convert_file(write_random_checkpoint(config, tmp_path / "base.safetensors", seed=3), config,
                            tmp_path / "base", handle_signals=False))


def test_lora_training_only_adapts_and_exports_a_loadable_file(tmp_path):
    workdir, base_dir = tmp_path / "run", pretrained_base(tmp_path)
    summary = train(lora_config(base_dir, max_steps=3, checkpoint_every=3), workdir)
    assert summary["step"] == 3
    meta = _read_metadata(workdir / "checkpoints" / "3" / "state")
    assert sorted(meta["params"]) == ["lora"]  # checkpoint and optimiser state: adapters only
    n_adapted = len(jax.tree_util.tree_leaves(meta["params"]))
    # 4 transformers (input, middle, 2 output blocks) x ((self, cross) x (q, k, v, out) + proj in / out) x 2
    assert n_adapted == 4 * (2 * 4 + 2) * 2
    assert len([p for p, _ in jax.tree_util.tree_leaves_with_path(meta["opt_state"])
                if "mu" in jax.tree_util.keystr(p)]) == n_adapted
    _, trained = restore_params(workdir / "checkpoints", use_ema=False)
    ups = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(trained) if "up" in jax.tree_util.keystr(p)]
    assert all(np.abs(u).max() > 0 for u in ups)  # every up factor left its zero init

    # the frozen base is the converted checkpoint, as loaded
    run = build_run(lora_config(base_dir, max_steps=3))
    base = jax.device_get(run.frozen())
    chex.assert_trees_all_equal(base, load_params(base_dir))

    # export -> the kohya loader merges it into the base -> the same UNet output as the trained run's
    path = export_workdir(workdir, tmp_path / "trained.safetensors", use_ema=False)
    merged = apply_loras(base, [(path, 1.0)])
    model = TrainedModel.load(workdir, use_ema=False)
    engine = run.task.engine
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    cond = engine.condition(model.params, {"cls": jnp.array([3, 7])})
    want = engine.denoise(jax.device_get(model.params), x, jnp.array([0.5, 2.0]), cond)
    got = engine.denoise(merged, x, jnp.array([0.5, 2.0]), cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    delta = engine.denoise(base, x, jnp.array([0.5, 2.0]), cond)
    assert np.abs(np.asarray(delta) - np.asarray(want)).max() > 1e-4  # the adapters do something


def test_bfloat16_frozen_base_halves_it_and_trains(tmp_path):
    """training.frozen_dtype=bfloat16: the LoRA's frozen base is held as the converted weights rounded to
    bfloat16 (half the bytes: the compile check's sdxl_lora on a v5e chip goes 13.19 -> 6.73 GiB of
    arguments), and the adapters still train."""
    base_dir = pretrained_base(tmp_path)
    run = build_run(lora_config(base_dir, max_steps=2, frozen_dtype="bfloat16"))
    base = jax.device_get(run.frozen())
    want = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(jnp.bfloat16), load_params(base_dir))
    chex.assert_trees_all_equal(base, want)
    assert {np.asarray(a).dtype for a in jax.tree_util.tree_leaves(base)} == {np.dtype(jnp.bfloat16)}
    shapes = run.task.frozen_shapes(run.example)
    assert {a.dtype for a in jax.tree_util.tree_leaves(shapes)} == {np.dtype(jnp.bfloat16)}
    summary = train(lora_config(base_dir, max_steps=2, log_every=1, frozen_dtype="bfloat16"), tmp_path / "run")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert summary["step"] == 2 and len(losses) == 2 and all(np.isfinite(losses)), losses
