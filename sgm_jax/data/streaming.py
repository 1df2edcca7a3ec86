"""Streaming datasets from the seed's data config: what `from_config` returns for
`sgm.data.dataset.StableDataModuleFromConfig` (and the short targets webdataset / arrayrecord / tfds).

    data:
      target: sgm.data.dataset.StableDataModuleFromConfig
      params:
        train:
          datapipeline:
            urls: [shards/data-{000000..000127}.tar]     # paths, globs, braces, folders, gs://
                                                         # *.array_record files, or "tfds:<name>"
            pipeline_config:
              shardshuffle: 10000        # > 0: a new shard order every epoch
              sample_shuffle: 10000      # window of consecutive samples shuffled together
              required_keys: [jpg, txt]  # a sample missing one is bad (skipped, counted)
              skip_bad_samples: true     # false: the first bad sample stops the run
              aspect_buckets: []         # [[H, W], ...]: each batch from one bucket (SDXL)
              num_streams: 0             # the data is read as this many streams (stream s: shards
                                         # s, s + S, ...), each giving batch_size / S rows of every
                                         # batch; hosts read blocks of streams. 0: one per host. The
                                         # batches depend on S alone: a run with the same S reads the
                                         # same global batches on 1, 2, ... S hosts
            preencoded: false            # true: shards of python -m sgm_jax.cli.preencode (latent
                                         # moments + frozen embeddings; postprocessors already applied)
            decoders: [pil]              # pil / rgb8: RGB; l8: grayscale
            postprocessors: [...]        # the seed's, see sgm_jax.data.transforms
          loader: {batch_size: 64, num_workers: 6}
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from sgm_jax.data import preencoded as P
from sgm_jax.data import transforms as T
from sgm_jax.data import webdataset as W
from sgm_jax.data.base import DataSource
from sgm_jax.data.pipeline import BatchIterator, StreamSpec
from sgm_jax.errors import UserError

log = logging.getLogger(__name__)
_MODES = {"pil": "RGB", "rgb": "RGB", "rgb8": "RGB", "pilrgb": "RGB", "l": "L", "l8": "L", "pill": "L"}


class BatchIterDataset(grain.IterDataset):
    """Grain source of one host's batches; Grain's mp_prefetch slices it over its workers."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec, self.slice = spec, slice(None)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self.slice = sl

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.spec, self.slice)


def _json_safe(x: Any) -> Any:
    """Grain's states may hold tuples or non-str keys; JSON keeps them as lists / str keys."""
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class StreamIterator:
    """This host's batches of a stream (the loop's iterator contract; see base.StepIterator).

    The host reads one or more of the data's streams (`slices`: each a StreamSpec over its own
    shards / records); its batch is their sub-batches one after another, so the global batch
    depends on the number of streams, never on how many hosts read them."""

    def __init__(self, slices: Sequence[StreamSpec], num_workers: int, prefetch: int, start_step: int = 0):
        self._its = [iter(_grain_dataset(spec, num_workers, prefetch)) for spec in slices]
        self.step, self.totals = 0, collections.Counter()
        # Without a saved state (set_state before the first batch), starting at step k means
        # replaying k batches: exact, but it reads the data again.
        self._replay = int(start_step)

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> dict:
        if self._replay:
            n, self._replay = self._replay, 0
            log.warning("stream iterator started at step %d without a saved state: replaying %d batches", n, n)
            for _ in range(n):
                next(self)
        parts = [dict(next(it)) for it in self._its]
        for part in parts:
            self.totals.update(part.pop("__stats__", {}))
        batch = parts[0] if len(parts) == 1 else _concat(parts)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        states = [_json_safe(it.get_state()) for it in self._its]
        return {"step": self.step, "stats": dict(self.totals), "grain": states[0] if len(states) == 1 else states}

    def set_state(self, state: dict) -> None:
        grain_states = state["grain"] if len(self._its) > 1 else [state["grain"]]
        try:
            if len(grain_states) != len(self._its) or not all(isinstance(g, dict) for g in grain_states):
                raise ValueError(f"{len(grain_states)} saved streams for the {len(self._its)} this host reads")
            for it, grain_state in zip(self._its, grain_states):
                it.set_state(grain_state)
            self._replay = 0
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the saved data iterator state does not fit this data config ({type(e).__name__}: {e}); "
                            "resume with the same urls, num_streams and num_workers") from None
        self.step, self.totals = int(state["step"]), collections.Counter(state.get("stats", {}))

    def stats(self) -> dict[str, float]:
        """Counters since the run began (the loop logs them as data/<name>)."""
        out = {k: float(v) for k, v in sorted(self.totals.items())}
        out["skipped_samples"] = float(sum(v for k, v in self.totals.items() if k != "truncated_shards"))
        return out

    def close(self) -> None:
        for it in self._its:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _grain_dataset(spec: StreamSpec, num_workers: int, prefetch: int) -> Any:
    ds: Any = BatchIterDataset(spec)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; scripts here use argparse
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=max(prefetch, 1)))
    return ds


def _concat(parts: Sequence[dict]) -> dict:
    """Sub-batches of the same keys -> one batch, rows in stream order."""
    shapes = {tuple(np.shape(p["jpg" if "jpg" in p else next(iter(p))])[1:]) for p in parts}
    if len(shapes) > 1:
        raise UserError(f"the data streams of one host gave images of different shapes {sorted(shapes)}: "
                        "aspect_buckets need num_streams equal to the number of hosts")
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


class StreamingDataset:
    """A streamed image / image-text dataset (same interface as ArrayDataset; no epochs).

    `spec` covers everything this host reads (its shards / records); `slices` are the
    streams it reads them as, each with its own shard order and shuffle."""

    def __init__(self, spec: StreamSpec, *, batch_size: int, num_workers: int, prefetch: int,
                 process_index: int, process_count: int, source: DataSource, example_items: tuple,
                 slices: Sequence[StreamSpec] = (), num_streams: int = 0):
        self.spec, self.batch_size, self.num_workers, self.prefetch = spec, batch_size, num_workers, prefetch
        self.process_index, self.process_count, self.source = process_index, process_count, source
        self.slices, self.num_streams = tuple(slices) or (spec,), num_streams or process_count
        self._example_items = example_items
        self._size: tuple | None = None

    def steps_per_epoch(self, batch_size: int) -> None:
        return None

    def iterator(self, batch_size: int, seed: int = 0, start_step: int = 0) -> StreamIterator:
        if batch_size % self.num_streams:
            raise UserError(f"global batch_size {batch_size} is not divisible by the {self.num_streams} data streams "
                            "(pipeline_config.num_streams, default one per host)")
        import dataclasses

        per_stream, size = batch_size // self.num_streams, self._image_size()
        slices = [dataclasses.replace(s, seed=int(seed), local_batch=per_stream, image_size=size) for s in self.slices]
        return StreamIterator(slices, self.num_workers, self.prefetch, start_step)

    def example_batch(self, n: int) -> dict[str, np.ndarray]:
        """The first n usable samples in file order (all hosts alike), unshuffled; with aspect
        buckets all are cropped to the largest bucket, pre-encoded ones come from one bucket
        (shapes for init, sample-grid conditioning)."""
        import dataclasses

        buckets = self.spec.buckets
        if buckets and not self.spec.preencoded:  # stored latents cannot be re-cropped: whichever bucket fills first
            buckets = (max(buckets, key=lambda b: b[0] * b[1]),)
        spec = dataclasses.replace(self.spec, items=self._example_items, shardshuffle=False, sample_shuffle=0,
                                   local_batch=int(n), buckets=buckets, seed=0, image_size=self._image_size())
        it = BatchIterator(spec)
        try:
            batch = next(it)
        finally:
            it.close()
        batch.pop("__stats__", None)
        return batch

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.spec.buckets:
            h, w = max(self.spec.buckets, key=lambda b: b[0] * b[1])
            return (int(h), int(w), 1 if self.spec.image_mode == "L" else 3)
        if self.spec.preencoded:  # the images are gone: their shape is recorded with each sample
            return P.image_shape(W.read_sample_at(self._example_items[0][1], 0))
        h, w = self._image_size()
        return (int(h), int(w), 1 if self.spec.image_mode == "L" else 3)

    def _image_size(self, n: int = 32) -> tuple:
        """(H, W) of every training image: the most common size of the first n usable samples in
        file order after the postprocessors (a stray image of another size is a bad sample,
        whichever comes first); () with buckets or pre-encoded samples, whose sizes are known."""
        if self.spec.buckets or self.spec.preencoded:
            return ()
        if self._size is None:
            import dataclasses

            spec = dataclasses.replace(self.spec, items=self._example_items, shardshuffle=False, sample_shuffle=0,
                                       local_batch=1, seed=0)
            it, sizes = BatchIterator(spec), collections.Counter()
            try:
                for _ in range(4 * n):  # bad samples count as tries: a stream of only bad ones still ends
                    identity, raw = it.window.next()
                    try:
                        sizes[tuple(it.transform_image(identity, raw)["jpg"].shape[:2])] += 1
                    except T.BadSample:
                        continue
                    if sum(sizes.values()) == n:
                        break
            finally:
                it.close()
            if not sizes:
                raise UserError(f"no usable sample among the first {4 * n} of {self.source.describe()}")
            self._size = sizes.most_common(1)[0][0]
        return self._size


def streaming_from_config(target: str, params: Mapping[str, Any], *, split: str = "train",
                          process_index: int | None = None, process_count: int | None = None) -> StreamingDataset:
    """StreamingDataset from the seed's `data.params` (see the module docstring)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    section = params.get(split) or params.get("train") or params
    if "datapipeline" not in section:
        raise UserError(f"data.params.{split} needs 'datapipeline' (urls, postprocessors, ...) and 'loader'")
    pipe, loader = dict(section["datapipeline"]), dict(section.get("loader") or {})
    pc = dict(pipe.get("pipeline_config") or {})
    batch_size, num_workers = int(loader.get("batch_size", 64)), int(loader.get("num_workers", 0))
    num_streams = int(pc.get("num_streams", 0)) or process_count
    if num_streams % process_count:
        raise UserError(f"pipeline_config.num_streams {num_streams} is not a multiple of the {process_count} hosts")
    if batch_size <= 0 or batch_size % num_streams:
        readers = (f"{num_streams} data streams (pipeline_config.num_streams)" if pc.get("num_streams")
                   else f"{process_count} hosts")
        raise UserError(f"data loader batch_size {batch_size} must be positive and divisible by {readers}")
    per_host = num_streams // process_count
    host_streams = range(process_index * per_host, (process_index + 1) * per_host)  # rows of this host, in order
    decoders = [str(d).lower() for d in pipe.get("decoders") or ["pil"]]
    if decoders[0] not in _MODES:
        raise UserError(f"data decoders {decoders}: supported {', '.join(sorted(_MODES))}")
    buckets = tuple((int(b[0]), int(b[1])) for b in pc.get("aspect_buckets") or ())
    if len(buckets) > 1 and num_streams > 1:
        # each stream fills its own buckets first-come; one global batch needs one shape on every stream
        raise UserError(f"aspect_buckets with {num_streams} data streams ({process_count} host(s)): the streams "
                        "would pick different buckets for one batch; train multi-aspect data on one host for now, "
                        "or crop to one size (aspect_buckets: [[H, W]])")
    urls = pipe.get("urls")
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    common = dict(seed=0, local_batch=batch_size // process_count, shardshuffle=bool(pc.get("shardshuffle", 1)),
                  sample_shuffle=int(pc.get("sample_shuffle", 0)),
                  postprocessors=tuple(pipe.get("postprocessors") or ()), image_mode=_MODES[decoders[0]],
                  required=tuple(pc.get("required_keys", ("jpg", "txt"))), buckets=buckets,
                  skip_bad_samples=bool(pc.get("skip_bad_samples", True)), preencoded=bool(pipe.get("preencoded")))
    T.build_steps(common["postprocessors"], buckets or None)  # config errors now, not in a worker
    if common["preencoded"] and any(".array_record" in str(u) or str(u).startswith("tfds:") for u in urls):
        raise UserError("datapipeline.preencoded reads the tar shards of python -m sgm_jax.cli.preencode, "
                        f"not {urls[0]}")
    if len(urls) == 1 and str(urls[0]).startswith("tfds:"):
        name = str(urls[0])[5:]
        records = W.TfdsSamples(name, split, pipe.get("tfds_data_dir"))
        kind, record_args, n = "tfds", (name, split, pipe.get("tfds_data_dir")), len(records)
        source = DataSource(name, "tfds", records.describe())
    elif urls and all(".array_record" in str(u) or "arrayrecord" in target for u in urls):
        paths = W.expand_urls(urls, suffixes=(".array_record",))
        records = W.ArrayRecordSamples(paths)
        kind, record_args, n = "array_record", tuple(paths), len(records)
        source = DataSource("arrayrecord", "array_record", records.describe(), files=tuple(paths))
    else:
        shards = W.expand_urls(urls)
        workers = max(num_workers, 1)
        if len(shards) < num_streams * workers:
            raise UserError(f"{len(shards)} shards cannot feed {num_streams} data stream(s) x {workers} worker(s) "
                            f"({process_count} host(s)): write at least {num_streams * workers} shards "
                            "(prepare_data.py --samples-per-shard) or lower loader.num_workers")
        streams = [tuple(enumerate(shards))[s::num_streams] for s in host_streams]
        slices = [StreamSpec(kind="tar", items=items, record_args=(), **common) for items in streams]
        spec = StreamSpec(kind="tar", items=tuple(sorted(sum(streams, ()))), record_args=(), **common)
        source = DataSource("webdataset", "tar", f"{len(shards)} shards: {shards[0]}"
                            + (f" ... {shards[-1]}" if len(shards) > 1 else ""), files=tuple(shards))
        return _dataset(spec, batch_size, num_workers, loader, process_index, process_count, source,
                        tuple(enumerate(shards)), slices, num_streams)
    if n < num_streams:
        raise UserError(f"{source.describe()}: fewer examples than data streams ({num_streams})")
    slices = [StreamSpec(kind=kind, items=(s, n, num_streams), record_args=record_args, **common) for s in host_streams]
    spec = StreamSpec(kind=kind, items=(process_index, n, process_count), record_args=record_args, **common)
    return _dataset(spec, batch_size, num_workers, loader, process_index, process_count, source, (0, n, 1),
                    slices, num_streams)


def _dataset(spec: StreamSpec, batch_size: int, num_workers: int, loader: dict, process_index: int,
             process_count: int, source: DataSource, example_items: tuple, slices: Sequence[StreamSpec],
             num_streams: int) -> StreamingDataset:
    return StreamingDataset(spec, batch_size=batch_size, num_workers=num_workers,
                            prefetch=int(loader.get("prefetch_factor", 2)), process_index=process_index,
                            process_count=process_count, source=source, example_items=example_items,
                            slices=slices, num_streams=num_streams)
