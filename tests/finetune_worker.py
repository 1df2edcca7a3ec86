"""Run by test_latent_training.py in a subprocess with 8 simulated CPU devices.

    python tests/finetune_worker.py CONVERTED_DIR SHARDS_URLS OUT_DIR

Fine-tunes tests/configs/micro_sdxl.py (configs/sdxl_finetune.finetune, remat on: UNet trains with FSDP over 8 devices,
VAE + both text towers frozen) from a converted checkpoint on captioned tar shards, once for
4 steps and once for 2 + 2 (resumed), and writes what the test checks to OUT_DIR/result.npz.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sgm_jax import parallel
from sgm_jax.checkpointing.checkpoint import _read_metadata, restore_params
from sgm_jax.checkpointing.frozen import merge_params
from sgm_jax.cli.configs import load_config
from sgm_jax.configs import sdxl_finetune
from sgm_jax.training.loop import build_run, train

parallel.MIN_FSDP_SIZE = 1024  # shard even this tiny model's larger kernels
MICRO_SDXL = Path(__file__).with_name("configs") / "micro_sdxl.py"


def config(ckpt: str, urls: str, steps: int):
    c = sdxl_finetune.finetune(load_config(str(MICRO_SDXL)).model.to_dict(), name="tiny_finetune", size=64, buckets=(),
                               batch_size=8, lr=1e-3, sample_steps=2)
    c.model.params.ckpt_path = ckpt
    c.model.params.network_config.params.use_checkpoint = True
    c.data.params.train.datapipeline.urls = urls
    c.data.params.train.loader.num_workers = 0
    c.training.update(max_steps=steps, checkpoint_every=2, log_every=1, sample_every=0, dtype="float32",
                      checkpoint_async=False, report_flops=False)
    return c


def fixed_loss(run, params, frozen) -> float:
    """The loss on one fixed batch, averaged over 4 noise draws (one compiled call)."""
    batch = run.prepare(next(run.dataset.iterator(8, seed=123)))
    engine = run.task.engine
    full = merge_params(jax.device_get(params), jax.device_get(frozen))  # all on one device
    losses = jax.jit(jax.vmap(lambda k: engine.loss(full, batch, k)[0]))(jax.random.split(jax.random.key(0), 4))
    return float(np.mean(losses))


def main() -> None:
    ckpt, urls, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    jax.config.update("jax_compilation_cache_dir", os.environ.get("SGM_JAX_TEST_CACHE", str(out / "jax_cache")))
    t0 = time.time()
    run = build_run(config(ckpt, urls, 4))  # one compiled step for the three runs
    full = train(config(ckpt, urls, 4), out / "full", run)
    t1 = time.time()
    train(config(ckpt, urls, 2), out / "resumed", run)
    resumed = train(config(ckpt, urls, 4), out / "resumed", run)
    t2 = time.time()

    frozen = run.frozen()
    initial = run.task.initial_params(run.example)
    _, trained = restore_params(out / "full" / "checkpoints", use_ema=False)
    _, trained_resumed = restore_params(out / "resumed" / "checkpoints", use_ema=False)
    meta = _read_metadata(out / "full" / "checkpoints" / "4" / "state")
    leaves = lambda t: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    sharded = sum(1 for s in jax.tree_util.tree_leaves(run.state_sharding.params) if any(s.spec))
    np.savez(out / "result.npz",
             loss_before=fixed_loss(run, initial, frozen), loss_after=fixed_loss(run, trained, frozen),
             resume_equal=all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained),
                                                                   jax.tree_util.tree_leaves(trained_resumed))),
             model_changed=any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(initial),
                                                                          jax.tree_util.tree_leaves(trained))),
             devices=len(jax.devices()), sharded_leaves=sharded)
    (out / "summary.json").write_text(json.dumps({
        "steps": [full["step"], resumed["step"]],
        "checkpoint_parts": sorted(meta["params"]),
        "opt_state_leaves_per_moment": len([k for k in leaves(meta["opt_state"]) if "['mu']" in k]),
        "trainable_leaves": len(leaves(meta["params"])),
        "frozen_parts": sorted(frozen),
    }))
    print("done", json.loads((out / "summary.json").read_text()),
          f"seconds: first run {t1 - t0:.0f}, 2 + 2 resumed {t2 - t1:.0f}, checks {time.time() - t2:.0f}")


if __name__ == "__main__":
    main()
