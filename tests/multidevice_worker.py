"""Run by test_parallel.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N.

    python tests/multidevice_worker.py MODE OUT_DIR [DATA_DIR]

MODE: "steps:<data>x<fsdp>" runs 3 train steps on that mesh and writes params + losses to
OUT_DIR/result_<data>x<fsdp>.npz; "save:<data>x<fsdp>" also checkpoints to OUT_DIR/ckpt;
"resume:<data>x<fsdp>" restores OUT_DIR/ckpt on that mesh and runs 1 more step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sgm_jax.configs import mnist_cond  # noqa: E402
from sgm_jax import parallel  # noqa: E402
from sgm_jax.checkpointing.checkpoint import Checkpointer  # noqa: E402
from sgm_jax.training.loop import build_run  # noqa: E402

parallel.MIN_FSDP_SIZE = 1024  # shard even this tiny model's larger kernels


def tiny_config(data: int, fsdp: int, data_dir: str | None):
    config = mnist_cond.get_config()
    config.model.base_learning_rate = 1e-3
    config.model.params.use_ema = True
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32)
    config.data.params.update(batch_size=16, path=data_dir or "")
    config.mesh.update(data=data, fsdp=fsdp)
    return config


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    data_dir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    kind, shape = mode.split(":")
    data, fsdp = (int(v) for v in shape.split("x"))
    run = build_run(tiny_config(data, fsdp, data_dir))
    key = jax.random.key(7)
    sharded = sum(1 for s in jax.tree_util.tree_leaves(run.state_sharding.params) if any(s.spec))
    if kind == "resume":
        ckpt = Checkpointer(out / "ckpt")
        _, state, _ = ckpt.restore_latest(run.abstract_with_sharding())
        ckpt.close()
        steps = [int(state.step)]
    else:
        state = run.init_fn(jax.random.key(0))
        steps = [0, 1, 2]
    losses = []
    nonfinite = run.nonfinite_start()
    for step in steps:
        batch = parallel.shard_batch(run.dataset.batch_at(step, 16), run.mesh)
        state, metrics, nonfinite = run.step_fn(state, batch, key, nonfinite, None)
        losses.append(float(metrics["loss"]))
    if kind == "save":
        ckpt = Checkpointer(out / "ckpt")
        ckpt.save(int(state.step), state, force=True)
        ckpt.close()
    np.savez(out / f"result_{kind}_{shape}.npz", losses=np.array(losses), devices=len(jax.devices()),
             sharded_leaves=sharded, **{"p" + k: v for k, v in flat(state.params).items()},
             **{"e" + k: v for k, v in flat(state.ema_params).items()})
    print(f"{mode}: losses {losses}, {len(jax.devices())} devices, {sharded} sharded param leaves")


if __name__ == "__main__":
    main()
