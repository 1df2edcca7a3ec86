"""Where streamed samples come from: webdataset tar shards and random-access record sources.

Shards are given as the seed's `urls`: paths, globs, brace patterns
(`shards/data-{000000..000127}.tar`, `{a,b}`), folders (every *.tar inside), local or on any
filesystem etils.epath reads (gs://...). A webdataset sample is the run of consecutive tar
members sharing a key (the member name up to its first dot): `<key>.jpg` + `<key>.txt` ...
Each sample is identified by (shard, byte offset of its first member's header), so it can be
read again directly (`read_sample_at`) and a shard can be resumed mid-way by seeking.

Random-access sources (ArrayRecord files written by prepare_data.py, tfds `data_source`)
serve samples by index.
"""

from __future__ import annotations

import glob
import io
import itertools
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import msgpack

from sgm_jax.errors import UserError

_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> [a-000.tar, a-001.tar, a-002.tar] (zero padding kept); `{x,y}` lists."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for c in choices for x in expand_braces(head + c + tail)]


def _is_remote(path: str) -> bool:
    return "://" in path


def _epath(path: str) -> Any:
    from etils import epath

    return epath.Path(path)


def expand_urls(urls: str | Sequence[str], suffixes: Sequence[str] = (".tar",)) -> list[str]:
    """Every shard the seed-style `urls` name, in the order given (braces expanded, globs and
    folders sorted). One UserError line when an entry matches nothing."""
    urls = [u for u in ([urls] if isinstance(urls, str) else list(urls)) if str(u).strip()]
    if not urls:
        raise UserError("data urls is empty: set config.data.params.train.datapipeline.urls to shard paths, globs, "
                        "brace patterns or a folder (shards/data-{000000..000009}.tar)")
    out: list[str] = []
    for url in urls:
        found: list[str] = []
        for pattern in expand_braces(str(url)):
            if _is_remote(pattern):
                p = _epath(pattern)
                if any(ch in pattern for ch in "*?["):
                    root = pattern.split("://", 1)
                    base = _epath(root[0] + "://" + root[1].split("/", 1)[0])
                    found += sorted(str(x) for x in base.glob(root[1].split("/", 1)[1]))
                elif p.is_dir():
                    found += sorted(str(x) for x in p.iterdir() if str(x).endswith(tuple(suffixes)))
                elif p.exists():
                    found.append(pattern)
            elif any(ch in pattern for ch in "*?["):
                found += sorted(glob.glob(str(Path(pattern).expanduser())))
            elif Path(pattern).expanduser().is_dir():
                found += sorted(str(x) for x in Path(pattern).expanduser().iterdir() if x.name.endswith(tuple(suffixes)))
            elif Path(pattern).expanduser().is_file():
                found.append(str(Path(pattern).expanduser()))
        if not found:
            raise UserError(f"data urls entry {url!r} matches no {'/'.join(suffixes)} file")
        out += found
    return out


def open_binary(url: str) -> BinaryIO:
    return _epath(url).open("rb") if _is_remote(url) else open(url, "rb")


def split_key(name: str) -> tuple[str, str] | None:
    """webdataset's member naming: ("dir/key", "ext") for "dir/key.ext"; None for other names."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class ShardReader:
    """Samples of one tar shard, read sequentially from byte `offset` (a sample boundary).

    Iterating yields (offset, sample) where sample maps extension -> bytes plus "__key__" and
    "__url__". Afterwards `next_offset` is the offset of the first member not yet consumed,
    and `truncated` says whether the shard ended mid-archive (a short read, a cut member or a
    missing end-of-archive marker); the sample that was cut is not yielded.
    """

    def __init__(self, url: str, offset: int = 0):
        self.url, self.next_offset, self.truncated = url, int(offset), False
        self._file = open_binary(url)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        f = self._file
        f.seek(self.next_offset)
        current: dict | None = None
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            while True:
                member = tar.next()
                if member is None:
                    break
                parts = split_key(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    start = current.pop("__offset__")
                    self.next_offset = member.offset
                    yield start, current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": self.url, "__offset__": member.offset}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                current[ext] = data
            end = tar.offset
        except (tarfile.ReadError, EOFError, OSError):
            self.truncated = True
            return
        f.seek(end)
        tail = f.read(1024)
        if len(tail) < 1024 or any(tail):
            self.truncated = True  # the archive stops without its end-of-archive blocks
            return
        if current is not None:
            start = current.pop("__offset__")
            self.next_offset = end
            yield start, current
        self.next_offset = end


def read_sample_at(url: str, offset: int) -> dict:
    """The sample whose first member header starts at byte `offset` of shard `url`."""
    with ShardReader(url, offset) as reader:
        for _, sample in reader:
            return sample
    raise ValueError(f"{url}: no complete sample at byte {offset}")


def shard_samples(url: str) -> Iterator[dict]:
    """Every complete sample of one shard, in order (used by tests, example batches, tools)."""
    with ShardReader(url) as reader:
        for _, sample in reader:
            yield sample


# ------------------------------------------------------------------- random-access records


def pack_record(sample: dict) -> bytes:
    """One sample (extension -> bytes or str) as an ArrayRecord record (msgpack)."""
    return msgpack.packb({k: v for k, v in sample.items() if not k.startswith("__")}, use_bin_type=True)


def unpack_record(record: bytes) -> dict:
    return msgpack.unpackb(record, raw=False)


class ArrayRecordSamples:
    """ArrayRecord files (prepare_data.py --format array_record) as a random-access sample source."""

    def __init__(self, paths: Sequence[str]):
        import grain

        self.paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        sample = unpack_record(self._source[int(index)])
        sample["__key__"] = str(index)
        return sample

    def describe(self) -> str:
        return f"{len(self.paths)} ArrayRecord files ({self.paths[0]}{' ...' if len(self.paths) > 1 else ''})"


class TfdsSamples:
    """A prepared tensorflow-datasets set read through tfds.data_source (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:
            raise UserError(f"tensorflow-datasets {name!r} split {split!r} is not prepared in "
                            f"{data_dir or 'the default data_dir'} ({type(e).__name__})") from None
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._source[int(index)])
        record["__key__"] = str(index)
        return record

    def describe(self) -> str:
        return f"tfds {self.name}[{self.split}] ({len(self)} examples)"


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def write_tar_shards(samples: Iterator[dict], pattern: str, samples_per_shard: int) -> list[str]:
    """Write samples (key -> "__key__", extension -> bytes / str) to tar shards named
    pattern % shard_index; returns the paths. Members are written in key order per sample."""
    paths = []
    for index, chunk in enumerate(chunks(samples, samples_per_shard)):
        path = pattern % index
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path + ".tmp", "w", format=tarfile.GNU_FORMAT) as tar:
            for sample in chunk:
                for ext, value in sample.items():
                    if ext.startswith("__"):
                        continue
                    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        Path(path + ".tmp").replace(path)
        paths.append(path)
    return paths


def replace_shard_set(out_dir: str | Path, name: str, samples: Iterator[dict], samples_per_shard: int,
                      writer: Callable[[Iterator[dict], str, int], list[str]] = write_tar_shards,
                      suffix: str = ".tar") -> list[str]:
    """Shards `<out_dir>/<name>-NNNNNN<suffix>` of `samples` (by `writer`: tar shards, or e.g.
    ArrayRecord files), in place of the earlier `<name>-*<suffix>` there. They are written in a
    hidden folder first and moved in only when all are written, so a failed or interrupted pass
    (or one that writes nothing) leaves the earlier shards intact. Returns the paths, in order."""
    out = Path(out_dir)
    partial = out / f".{name}-partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        paths = writer(samples, str(partial / f"{name}-%06d{suffix}"), samples_per_shard)
        if paths:
            for old in out.glob(f"{name}-*{suffix}"):
                old.unlink()
            paths = [str(Path(path).replace(out / Path(path).name)) for path in paths]
        return paths
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def shard_urls(paths: Sequence[str]) -> str:
    """datapipeline.urls for shards `...-000000.tar` .. `...-NNNNNN.tar` in order: a brace pattern,
    or the one path."""
    if len(paths) == 1:
        return str(paths[0])
    first = str(paths[0])
    at = first.rindex("000000")
    return f"{first[:at]}{{000000..{len(paths) - 1:06d}}}{first[at + 6:]}"
