"""Pre-encode a latent model's training data once, as maxdiffusion and the MLPerf SD reference do:
the first stage's posterior moments and the outputs of every frozen embedder with weights go into
webdataset tar shards (format: sgm_jax.data.preencoded), so training skips the VAE encoder and the
frozen text towers on every step.

    python -m sgm_jax.cli.preencode --config configs/sdxl_finetune.py --out data/sdxl_pre \
        --config.model.params.ckpt_path=checkpoints/sd_xl_base --config.data.params.train.datapipeline.urls=...
    python train.py --config configs/sdxl_finetune.py --config.model.params.ckpt_path=checkpoints/sd_xl_base \
        --config.data.params.train.datapipeline.urls='data/sdxl_pre/preencoded-*.tar' \
        --config.data.params.train.datapipeline.preencoded=True

The config's training data is read once, in shard order, unshuffled; its decoders and
postprocessors apply (a random crop or flip is drawn once, from the sample's identity, and kept,
like maxdiffusion's fixed crop). The frozen parts are those the trainer loads (frozen.py), encoded
in the trainer's compute dtype over the config's mesh. Training from the shards gives the loss of
the raw data with the same key and params (the posterior sample is drawn from the stored
moments); the trainer still loads the frozen parts for its sample grids (decoder, prompts).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from sgm_jax import data, multihost, parallel
from sgm_jax.data import STREAMING_TARGETS
from sgm_jax.data import preencoded as P
from sgm_jax.data.pipeline import collate, samples_once
from sgm_jax.data.webdataset import replace_shard_set, shard_urls
from sgm_jax.errors import UserError
from sgm_jax.nn.conditioner import GeneralConditioner

from .diffusion_task import DiffusionTask
from .tasks import task_class

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def stored_embedders(engine: Any, frozen: Mapping[str, Any]) -> tuple[int, ...]:
    """Indices of the embedders whose outputs are stored: frozen ones with loaded weights
    (parameter-free ones such as the size embedders are cheap: their inputs pass through)."""
    specs, have = engine.conditioner.specs, frozen.get("conditioner", {})
    stored = tuple(i for i, s in enumerate(specs) if not s.is_trainable and f"embedders_{i}" in have)
    stored_inputs = {specs[i].input_key for i in stored}
    for i, spec in enumerate(specs):
        # legacy ucg replaces an input (for later embedders too), which a stored output cannot undergo
        if spec.legacy_ucg_value is not None and spec.ucg_rate > 0 and spec.input_key in stored_inputs:
            raise UserError(f"embedder {i} ({spec.target}) uses legacy_ucg_value on '{spec.input_key}', which a "
                            "pre-encoded embedder reads: train this config from the raw data")
    return stored


def passthrough_keys(engine: Any, stored: Sequence[int]) -> set[str]:
    """Batch fields kept as they are: every embedder's input (trainable embedders run on them, grids
    embed prompts with the frozen ones), captions and labels. Never the images."""
    keys = {"txt", "cls"}
    for i, spec in enumerate(engine.conditioner.specs):
        for key in [spec.input_key] if spec.input_key is not None else list(spec.input_keys):
            if key == engine.input_key and i not in stored:
                raise UserError(f"embedder {i} ({spec.target}) reads the images '{key}', which pre-encoded shards "
                                "do not hold: train this config from the raw data")
            keys.add(key)
    keys.discard(engine.input_key)
    return keys


def make_encoder(engine: Any, stored: Sequence[int], dtype: Any) -> Callable[[Any, Mapping[str, Any]], dict]:
    """(frozen params, prepared batch) -> {MOMENTS_KEY: [B, h, w, 2c], embedding_key(i, j): [B, ...]}."""
    def encode(frozen: Any, batch: Mapping[str, Any]) -> dict:
        out = {P.MOMENTS_KEY: engine.posterior_moments(frozen, batch[engine.input_key])}
        out.update(engine.conditioner.apply({"params": frozen.get("conditioner", {})}, batch, tuple(stored),
                                            method=GeneralConditioner.embedder_outputs))
        return {k: v.astype(dtype) for k, v in out.items()}

    return encode


def _check_config(config: Any) -> None:
    if task_class(config.model.target) is not DiffusionTask:
        raise UserError(f"model.target {config.model.target} is not a DiffusionEngine: nothing to pre-encode")
    if str(config.data.get("target", "")) not in STREAMING_TARGETS:
        raise UserError(f"data.target {config.data.get('target')!r} is not a streaming data set: pre-encoding reads "
                        "webdataset tar shards (prepare_data.py writes them)")


def preencode(config: Any, out_dir: str | Path, *, dtype: str = "float32", samples_per_shard: int = 1000,
              name: str = "preencoded", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the shards; returns {"paths", "samples", "skipped" (counts by reason), "urls" (for the
    datapipeline), "stored_embedders", "passthrough", "image_shapes"}."""
    _check_config(config)
    if dtype not in STORE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if samples_per_shard <= 0:
        raise UserError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.glob(f"{name}-*.tar")) and not overwrite:
        raise UserError(f"{out} already holds {name}-*.tar shards (--overwrite replaces them)")
    multihost.sync("sgm_jax:preencode_checked")  # no host writes before every host has looked
    dataset = data.from_config(config.data, split="train")
    if dataset.spec.kind != "tar":
        raise UserError(f"pre-encoding reads webdataset tar shards, not {dataset.source.describe()}")
    if dataset.spec.preencoded:
        raise UserError("datapipeline.preencoded is already True: point the config at the raw image shards")
    task = DiffusionTask(config, dataset)
    engine = task.engine
    if engine.first_stage is None:
        raise UserError("this config has no first stage (model.params.first_stage_config): pre-encoding stores "
                        "latent moments; train pixel-space models from the raw data")
    # several hosts: each encodes its own shards on its own devices (no collectives: their sample
    # counts differ) and writes <name>-host<p>-NNNNNN.tar; the glob <name>-*.tar reads them all
    local = jax.local_devices()
    fsdp = len(local) if int(config.mesh.fsdp) == -1 else int(config.mesh.fsdp)
    mesh = parallel.make_mesh(-1, fsdp if len(local) % fsdp == 0 else 1, devices=local)
    hosts, host = jax.process_count(), jax.process_index()
    shard_name = name if hosts == 1 else f"{name}-host{host:03d}"
    batch_size = int(dataset.batch_size)
    parallel.global_batch_size_check(batch_size, mesh)
    example = task.prepare_batch({k: v[:2] for k, v in dataset.example_batch(2).items()})
    frozen = task.frozen_params(example, lambda t: jax.device_put(t, parallel.param_shardings(t, mesh)))
    stored = stored_embedders(engine, frozen)
    keep = passthrough_keys(engine, stored)
    encode = jax.jit(make_encoder(engine, stored, STORE_DTYPES[dtype]))
    counts: collections.Counter = collections.Counter()
    shapes: set[tuple[int, ...]] = set()
    index = 0

    def encode_group(items: list[tuple[str, dict]]) -> Iterator[dict]:
        nonlocal index
        n = len(items)
        raw = collate([s for _, s in items + items[-1:] * (batch_size - n)], dataset.spec.required)  # static shapes
        encoded = jax.device_get(encode(frozen, parallel.shard_batch(task.prepare_batch(raw), mesh)))
        image_shape = raw["jpg"].shape[1:]
        shapes.add(tuple(int(s) for s in image_shape))
        for r, (key, _) in enumerate(items):
            fields = {k: np.asarray(v[r]) for k, v in encoded.items()}
            fields.update({k: raw[k][r] for k in sorted(keep) if k in raw})
            yield P.encode_sample(f"{index:09d}", fields, image_shape, source=key)
            index += 1

    def samples() -> Iterator[dict]:
        groups: dict[tuple, list] = {}  # by image shape: aspect buckets encode one shape per batch
        for key, sample in tqdm(samples_once(dataset.spec, counts), desc="pre-encoding", unit="img",
                                disable=not progress):
            group = groups.setdefault(np.shape(sample["jpg"]), [])
            group.append((key, sample))
            if len(group) == batch_size:
                yield from encode_group(groups.pop(np.shape(sample["jpg"])))
        for group in groups.values():
            yield from encode_group(group)

    # (--overwrite) a failed or interrupted pass leaves the earlier shards intact
    paths = replace_shard_set(out, shard_name, samples(), samples_per_shard)
    every = multihost.gather_json({"paths": paths, "samples": index, "skipped": dict(counts),
                                   "shapes": sorted(shapes)})
    paths = [path for h in every for path in h["paths"]]
    if not paths:
        raise UserError(f"no usable sample in the data ({dict(counts) or 'empty'})")
    skipped: collections.Counter = collections.Counter()
    for h in every:
        skipped.update(h["skipped"])
    result = {"paths": paths, "samples": sum(h["samples"] for h in every), "skipped": dict(skipped),
              "urls": shard_urls(paths) if hosts == 1 else str(out / f"{name}-*.tar"),
              "stored_embedders": list(stored), "passthrough": sorted(keep),
              "image_shapes": sorted({tuple(s) for h in every for s in h["shapes"]}), "dtype": dtype}
    if multihost.is_main():
        (out / f"{name}.json").write_text(json.dumps({k: v for k, v in result.items() if k != "paths"}, indent=1))
    return result
