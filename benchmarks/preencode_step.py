"""Train-step time from raw images vs from pre-encoded shards (sgm_jax.training.preencode), same
config, same batch, same params, measured in one process with compilation excluded.

    nice -n 19 python benchmarks/preencode_step.py [--steps 5] [--rounds 3] [--append benchmarks/RESULTS.md]

Models: configs/mnist_txt2img.py as it trains (frozen f4 first stage, here randomly initialised;
trainable text tower: only the encoder is saved) and `clipl_small`, txt2img_clipl's layout at
64 px for a CPU (SD-VAE-style f8 first stage with 64 base channels, a frozen 4-layer width-256
CLIP tower, size / crop embedders, a 64-channel UNet): the encoder and the tower are saved.
The step is the trainer's (DiffusionTask.train_step: loss, AdamW, EMA when configured); raw and
pre-encoded steps alternate in rounds so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def mnist_txt2img():
    from sgm_jax.cli.configs import load_config

    config = load_config(REPO / "configs" / "mnist_txt2img.py")
    config.model.params.first_stage_config.params.ckpt_path = ""  # random weights: the timing is the same
    return config, 32


def clipl_small():
    from sgm_jax.configs import txt2img_clipl
    from sgm_jax.configs.inference import _parts as P

    config = txt2img_clipl.get_config()
    params = config.model.params
    params.network_config = P.unet(in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1, 2],
                                   num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32,
                                   num_classes="sequential", adm_in_channels=256 + 2 * 512, transformer_depth=1,
                                   context_dim=256)
    text = params.conditioner_config.params.emb_models[0]
    text.update(is_trainable=False, legacy_ucg_value=None)
    text["params"].update(width=256, layers=4, heads=4)
    params.first_stage_config.params.ddconfig.update(ch=64, resolution=64)
    config.training.dtype = "float32"
    config.data.params.train.loader.batch_size = 8
    return config, 64


def raw_batch(engine, n: int, side: int) -> dict:
    rng = np.random.default_rng(0)
    channels = int(engine.first_stage.ddconfig["in_channels"])
    batch = {"jpg": rng.uniform(-1, 1, (n, side, side, channels)).astype(np.float32),
             "txt": np.asarray([f"a photo of the number {i % 10} in a caption of a few words" for i in range(n)])}
    for spec in engine.conditioner.specs:
        if spec.input_key and spec.input_key.endswith(("_as_tuple", "_top_left")):
            batch[spec.input_key] = np.tile(np.asarray([[side, side]], np.int32), (n, 1))
    return batch


def measure(name: str, build, steps: int, rounds: int) -> dict:
    from sgm_jax.checkpointing.frozen import split_params
    from sgm_jax.data.preencoded import MOMENTS_KEY
    from sgm_jax.training.diffusion_task import DiffusionTask
    from sgm_jax.training.preencode import make_encoder, stored_embedders

    config, side = build()
    n = int(config.data.params.train.loader.batch_size)
    task = DiffusionTask(config, None)  # the dataset is only read for grids and evaluation
    engine = task.engine
    raw = task.prepare_batch(raw_batch(engine, n, side))
    full = dict(engine.init_params(jax.random.key(0), raw))
    full["first_stage"] = engine.first_stage.init(jax.random.key(1), raw["jpg"][:1])["params"]
    trainable, frozen = split_params(engine, full)
    stored = stored_embedders(engine, frozen)
    encode = jax.jit(make_encoder(engine, stored, np.float32))
    pre = {**{k: v for k, v in raw.items() if k != "jpg"}, **jax.device_get(encode(frozen, raw))}
    step = jax.jit(task.train_step)
    states = {kind: task.init_state_from(trainable) for kind in ("raw", "pre")}
    batches = {"raw": raw, "pre": pre}
    compile_s = {}
    for kind in ("raw", "pre"):  # compile + first run, excluded
        t = time.perf_counter()
        states[kind], m = step(states[kind], batches[kind], jax.random.key(2), frozen)
        jax.block_until_ready(m)
        compile_s[kind] = time.perf_counter() - t
    times: dict[str, list[float]] = {"raw": [], "pre": [], "encode": []}
    for _ in range(rounds):
        for kind in ("raw", "pre"):
            t = time.perf_counter()
            for i in range(steps):
                states[kind], m = step(states[kind], batches[kind], jax.random.key(3 + i), frozen)
            jax.block_until_ready(m)
            times[kind].append((time.perf_counter() - t) / steps)
        t = time.perf_counter()
        jax.block_until_ready(encode(frozen, raw))
        times["encode"].append(time.perf_counter() - t)
    raw_s, pre_s = statistics.median(times["raw"]), statistics.median(times["pre"])
    latent = pre[MOMENTS_KEY].shape[1:3]
    return {"name": name, "batch": n, "image": f"{side}x{side}", "latent": f"{latent[0]}x{latent[1]}",
            "stored": "first stage" + "".join(f" + embedder {i}" for i in stored), "raw": raw_s, "pre": pre_s,
            "encode": statistics.median(times["encode"]), "saved": 1 - pre_s / raw_s,
            "compile": compile_s}


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | image | latent | stored | raw step s | pre-encoded step s | saved "
             "| encode pass s/batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} | {r['image']} | {r['latent']} | {r['stored']} | {r['raw']:.3f} | "
                     f"{r['pre']:.3f} | {100 * r['saved']:.0f}% | {r['encode']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and kind")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=("mnist_txt2img", "clipl_small"), default=None)
    p.add_argument("--append", help="append the table to this markdown file")
    args = p.parse_args()
    models = {"mnist_txt2img": mnist_txt2img, "clipl_small": clipl_small}
    rows = []
    for name, build in models.items():
        if args.only in (None, name):
            rows.append(measure(name, build, args.steps, args.rounds))
            print(name, {k: v for k, v in rows[-1].items() if k == "compile"}, flush=True)
    text = table(rows)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write(f"\n{text}\n")


if __name__ == "__main__":
    main()
