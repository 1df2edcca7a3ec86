"""Streaming input pipeline on Grain: shards -> (host, worker) slices -> per-epoch shard order ->
window shuffle -> decode + the seed's transforms -> (bucketed) batches, checkpointable.

Exact resume by deterministic index arithmetic, wrapped in Grain's checkpointable iterators:

* the stream of one worker is a pure function of (seed, its shard list): epoch e reads the
  shards in the order perm(seed, e) (shardshuffle), each from its first byte; the position
  is (epoch, rank of the shard in that order, byte offset of the next sample);
* `sample_shuffle` = W shuffles W consecutive samples at a time with perm(seed, window
  number) (a window shuffle: its state is where the window started plus how many of its
  samples were taken; restoring re-reads that one window);
* random crops and flips draw from rng(seed, epoch, shard, offset), the sample's identity;
* aspect buckets hold samples until one bucket has a full batch; the state lists the
  identities of the held samples, which are read again on restore (a few per bucket);
* with `num_workers` > 0, Grain's `mp_prefetch` runs one such pipeline per worker process
  on the worker's slice of the host's shards and interleaves their batches round-robin;
  its state holds each worker's state, so the order is exact for a fixed worker count.

Hosts: the data is read as S streams (`num_streams`, default one per host): stream s reads
shards s, s + S, ... (records: indices s, s + S, ...) and gives batch_size / S samples per step;
host p of P reads streams p S/P ... (p + 1) S/P - 1, one after another, so the hosts' batches
together form the global batch, the same for any P that divides S.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from sgm_jax.batch_keys import SIZE_KEYS
from sgm_jax.data import preencoded as P
from sgm_jax.data import transforms as T
from sgm_jax.data import webdataset as W
from sgm_jax.errors import UserError

log = logging.getLogger(__name__)


def _perm(seed: int, salt: int, n: int, shuffle: bool) -> np.ndarray:
    if not shuffle or n <= 1:
        return np.arange(n)
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, salt, n])).permutation(n)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to rebuild its pipeline (plain values: picklable)."""

    kind: str                                  # "tar" | "array_record" | "tfds"
    items: tuple                               # tar: ((global shard index, url), ...); records: (start, stop, step)
    record_args: tuple                         # array_record: paths; tfds: (name, split, data_dir)
    seed: int
    local_batch: int
    shardshuffle: bool = True
    sample_shuffle: int = 0
    postprocessors: tuple = ()
    image_mode: str = "RGB"
    required: tuple = ("jpg", "txt")
    buckets: tuple = ()
    skip_bad_samples: bool = True
    preencoded: bool = False                   # samples of sgm_jax.training.preencode: arrays, no image to decode
    image_size: tuple = ()                     # (H, W) every transformed image must have (() = the first's)


def _record_source(spec: StreamSpec) -> Any:
    if spec.kind == "array_record":
        return W.ArrayRecordSamples(spec.record_args)
    return W.TfdsSamples(*spec.record_args)


class _TarStream:
    """Raw samples of a list of shards, epoch after epoch. Identity: (epoch, shard, offset)."""

    def __init__(self, shards: Sequence[tuple[int, str]], seed: int, shuffle: bool):
        self.shards, self.seed, self.shuffle = list(shards), seed, shuffle
        self.epoch = self.rank = self.offset = 0
        self.counts: collections.Counter = collections.Counter()
        self._reader: W.ShardReader | None = None
        self._samples: Any = None
        self._seen_in_epoch = 0

    def _order(self) -> np.ndarray:
        return _perm(self.seed, self.epoch, len(self.shards), self.shuffle)

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._samples = None

    def next(self) -> tuple[tuple[int, ...], dict]:
        while True:
            if self._reader is None:
                index, url = self.shards[int(self._order()[self.rank])]
                self._reader = W.ShardReader(url, self.offset)
                self._samples, self._index = iter(self._reader), index
            item = next(self._samples, None)
            if item is not None:
                self.offset = self._reader.next_offset
                self._seen_in_epoch += 1
                return (self.epoch, self._index, item[0]), item[1]
            if self._reader.truncated:
                self.counts["truncated_shards"] += 1
                log.warning("shard %s is truncated after byte %d; its remaining samples are skipped",
                            self._reader.url, self._reader.next_offset)
            self._close()
            self.rank, self.offset = self.rank + 1, 0
            if self.rank == len(self.shards):
                if self._seen_in_epoch == 0:
                    raise UserError(f"no complete sample in any of {len(self.shards)} shards "
                                    f"({self.shards[0][1]} ...)")
                self.epoch, self.rank, self._seen_in_epoch = self.epoch + 1, 0, 0

    def fetch(self, identity: Sequence[int]) -> dict:
        url = dict(self.shards)[int(identity[1])]
        return W.read_sample_at(url, int(identity[2]))

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        self._close()
        self.epoch, self.rank, self.offset = int(state["epoch"]), int(state["rank"]), int(state["offset"])
        self._seen_in_epoch = 1  # resumed mid-epoch: the shards held samples before

    def close(self) -> None:
        self._close()


class _RecordStream:
    """Random-access records, a fresh permutation per epoch. Identity: (epoch, index)."""

    def __init__(self, source: Any, indices: range, seed: int, shuffle: bool):
        self.source, self.indices, self.seed, self.shuffle = source, indices, seed, shuffle
        self.epoch = self.pos = 0
        self.counts: collections.Counter = collections.Counter()
        self._order_cache: tuple[int, np.ndarray] | None = None

    def next(self) -> tuple[tuple[int, ...], dict]:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            self._order_cache = (self.epoch, _perm(self.seed, self.epoch, len(self.indices), self.shuffle))
        index = self.indices[int(self._order_cache[1][self.pos])]
        identity = (self.epoch, index)
        self.pos += 1
        if self.pos == len(self.indices):
            self.epoch, self.pos = self.epoch + 1, 0
        return identity, self.source[index]

    def fetch(self, identity: Sequence[int]) -> dict:
        return self.source[int(identity[1])]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def close(self) -> None:
        pass


class _WindowShuffle:
    """Shuffles `size` consecutive stream samples at a time with perm(seed, window number)."""

    def __init__(self, stream: Any, size: int, seed: int):
        self.stream, self.size, self.seed = stream, max(int(size), 1), seed
        self.window, self.taken, self.start = -1, 0, stream.get_state()
        self.buffer: list = []

    def _fill(self) -> None:
        self.start = self.stream.get_state()
        self.buffer = [self.stream.next() for _ in range(self.size)]
        order = _perm(self.seed, 1_000_003 + self.window, self.size, self.size > 1)
        self.buffer = [self.buffer[i] for i in order]

    def next(self) -> tuple[tuple[int, ...], dict]:
        if self.taken >= len(self.buffer):
            self.window, self.taken = self.window + 1, 0
            self._fill()
        item = self.buffer[self.taken]
        self.taken += 1
        return item

    def get_state(self) -> dict:
        return {"window": self.window, "taken": self.taken, "start": self.start}

    def set_state(self, state: dict) -> None:
        self.window, self.taken = int(state["window"]), int(state["taken"])
        self.stream.set_state(state["start"])
        self.buffer = []
        if self.window >= 0:
            self._fill()
        else:
            self.start = self.stream.get_state()


def collate(samples: list[dict], required: Sequence[str]) -> dict[str, Any]:
    """Transformed raw samples -> {"jpg": [b, H, W, C] float32, "txt" / "cls" when required, size keys}."""
    images = np.stack([s["jpg"] for s in samples])  # uint8 after the crop: converted once, in place
    batch: dict[str, Any] = {"jpg": T.pixel_values(images, samples[0]["__pixel_ops__"])}
    for key in required:
        if key == "txt":
            batch["txt"] = np.asarray([s["txt"] for s in samples])
        elif key == "cls":
            batch["cls"] = np.asarray([s["cls"] for s in samples], np.int32)
    for key in SIZE_KEYS:
        if all(key in s for s in samples):
            batch[key] = np.stack([s[key] for s in samples]).astype(np.int32)
    return batch


def _bucket_of(image_shape: Sequence[int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the aspect bucket a pre-encoded image was cropped to."""
    size = (int(image_shape[0]), int(image_shape[1]))
    if size not in buckets:
        raise UserError(f"a pre-encoded image of {size[0]} x {size[1]} fits none of aspect_buckets {list(buckets)}: "
                        "pre-encode with the buckets you train with")
    return list(buckets).index(size)


class BatchIterator(grain.DatasetIterator):
    """One worker's batches: {"jpg": [b, H, W, C] float32 in [-1, 1], "txt" [b] str, "cls" [b]
    int32, size keys [b, 2] int32, "__stats__": skipped-sample counts since the last batch}; from
    pre-encoded shards the stored arrays (sgm_jax.data.preencoded) instead of "jpg"."""

    def __init__(self, spec: StreamSpec, sl: slice = slice(None)):
        super().__init__()
        self.spec = spec
        if spec.kind == "tar":
            shards = list(spec.items)[sl]
            if not shards:
                raise UserError("a data worker got no shard: use at most as many workers per host as shards per host")
            self.stream: Any = _TarStream(shards, spec.seed, spec.shardshuffle)
        else:
            self.stream = _RecordStream(_record_source(spec), range(*spec.items)[sl], spec.seed, spec.shardshuffle)
        self.window = _WindowShuffle(self.stream, spec.sample_shuffle if spec.kind == "tar" else 1, spec.seed)
        self.steps = T.build_steps(spec.postprocessors, spec.buckets or None)
        self.pending: dict[int, list] = {}
        self.counts: collections.Counter = collections.Counter()
        self._size: tuple = ()
        self._named: set[str] = set()

    def transform(self, identity: Sequence[int], raw: dict) -> dict:
        if self.spec.preencoded:  # the transforms ran when the shards were written
            sample = P.decode_sample(raw, self.spec.required)
            if self.spec.buckets:
                sample["__bucket__"] = _bucket_of(sample["__image_shape__"], self.spec.buckets)
            return sample
        sample = self.transform_image(identity, raw)
        if not self.spec.buckets:  # buckets crop every image to its bucket; otherwise one size must fit all
            self._check_size(tuple(sample["jpg"].shape[:2]))
        return sample

    def transform_image(self, identity: Sequence[int], raw: dict) -> dict:
        """A raw image sample decoded and transformed (no size check)."""
        if P.is_preencoded(raw):
            raise UserError(f"sample {raw.get('__key__')} in {raw.get('__url__', 'the data')} is pre-encoded: "
                            "set datapipeline.preencoded=True to train from it")
        sample = T.decode(raw, self.spec.image_mode, ("jpg",) + tuple(self.spec.required))
        return T.apply_steps(sample, self.steps, T.sample_rng(self.spec.seed, identity), to_float=False)

    def _check_size(self, size: tuple[int, int]) -> None:
        expected = tuple(self.spec.image_size) or self._size
        if not expected:
            self._size = size
        elif size != expected:
            raise T.BadSample("wrong_size", f"{size[0]}x{size[1]} image after the postprocessors, but the model "
                              f"trains on {expected[0]}x{expected[1]} (resize / crop all images to one size)")

    def __next__(self) -> dict:
        while True:
            identity, raw = self.window.next()
            try:
                sample = self.transform(identity, raw)
            except T.BadSample as e:
                if not self.spec.skip_bad_samples:
                    raise UserError(f"bad sample {raw.get('__key__')} in {raw.get('__url__', 'records')}: {e} "
                                    "(pipeline_config.skip_bad_samples=True skips and counts them)") from None
                if e.kind not in self._named:  # the first of each kind by name, the rest counted
                    log.warning("skipping bad sample %s in %s: %s (counted as data/%s)", raw.get("__key__"),
                                raw.get("__url__", "records"), e, e.kind)
                    self._named.add(e.kind)
                self.counts[e.kind] += 1
                continue
            key = int(sample.pop("__bucket__", 0))
            bucket = self.pending.setdefault(key, [])
            bucket.append((identity, sample))
            if len(bucket) == self.spec.local_batch:
                del self.pending[key]
                return self._collate([s for _, s in bucket])

    def _collate(self, samples: list[dict]) -> dict:
        batch = P.collate(samples) if self.spec.preencoded else collate(samples, self.spec.required)
        self.counts.update(self.stream.counts)
        self.stream.counts.clear()
        batch["__stats__"] = dict(self.counts)
        self.counts.clear()
        return batch

    def get_state(self) -> dict:
        pending = [[b, [list(i) for i, _ in items]] for b, items in sorted(self.pending.items())]
        return {"window": self.window.get_state(), "pending": pending}

    def set_state(self, state: dict) -> None:
        self.window.set_state(state["window"])
        self.pending = {}
        for b, identities in state.get("pending", []):
            for identity in identities:
                sample = self.transform(identity, self.stream.fetch(identity))
                sample.pop("__bucket__", None)
                self.pending.setdefault(int(b), []).append((tuple(identity), sample))

    def close(self) -> None:
        self.stream.close()


def samples_once(spec: StreamSpec, counts: collections.Counter) -> Iterator[tuple[str, dict]]:
    """Every usable sample of a tar stream once, in shard order, transformed as in epoch 0 of
    training (random crops drawn from the sample's identity, then fixed): (key, sample) pairs
    for pre-encoding. Bad samples and truncated shards are skipped and counted in `counts`."""
    iterator = BatchIterator(dataclasses.replace(spec, shardshuffle=False, sample_shuffle=0))
    for index, url in spec.items:
        with W.ShardReader(url) as reader:
            for offset, raw in reader:
                try:
                    sample = iterator.transform((0, index, offset), raw)
                except T.BadSample as e:
                    counts[e.kind] += 1
                    continue
                yield raw["__key__"], sample
            if reader.truncated:
                counts["truncated_shards"] += 1
