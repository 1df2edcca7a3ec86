"""Pack a folder of images into training shards (what prepare_data.py runs).

Inputs, each sample keeping its original image bytes (no re-encoding):
  * a folder of images with same-name `.txt` captions (`cat.jpg` + `cat.txt`), searched recursively;
  * a folder of class sub-folders (`dogs/*.jpg`, `cats/*.jpg`): class ids are the sorted
    folder names' indices, written as `.cls` and in the metadata as `class_name`;
  * a CSV or parquet table with `path,caption` columns (paths relative to the table's folder).
Each sample gets `<key>.json` = {"width", "height", ...} from the image header, which the
seed's AddOriginalImageSizeAsTupleAndCropToSquare reads (h_key "height", w_key "width").
Outputs webdataset tar shards `<out>/<name>-000000.tar ...` (or ArrayRecord files) of N samples.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from sgm_jax.data import webdataset as W
from sgm_jax.errors import UserError, run_cli

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
TABLE_SUFFIXES = (".csv", ".parquet")


def list_folder(root: Path) -> list[dict]:
    """[{"path", "caption" | None, "cls" | None, "class_name" | None}] of an image folder."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"{root} holds no .jpg/.jpeg/.png/.webp image")
    class_dirs = sorted({p.parent.relative_to(root).parts[0] for p in images if p.parent != root})
    by_class = bool(class_dirs) and all(p.parent != root for p in images)
    entries = []
    for p in images:
        caption_file = p.with_suffix(".txt")
        entry = {"path": p, "caption": None, "cls": None, "class_name": None}
        if caption_file.is_file():
            try:
                entry["caption"] = caption_file.read_text("utf-8").strip()
            except UnicodeDecodeError:  # the sample is skipped and counted, the pack goes on
                entry["bad"] = caption_file
        if by_class:
            name = p.relative_to(root).parts[0]
            entry.update(cls=class_dirs.index(name), class_name=name)
        entries.append(entry)
    if not by_class and not any(e["caption"] or "bad" in e for e in entries):
        raise UserError(f"{root}: images have neither same-name .txt captions nor class sub-folders")
    return entries


def list_table(table: Path) -> list[dict]:
    """Entries of a CSV / parquet with `path` and `caption` columns."""
    if table.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(table).to_pylist()
    else:
        try:
            with open(table, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError:
            raise UserError(f"{table} is not UTF-8 text: save the path,caption table as UTF-8") from None
    if not rows or "path" not in rows[0] or "caption" not in rows[0]:
        raise UserError(f"{table} needs 'path' and 'caption' columns (found {list(rows[0]) if rows else 'no rows'})")
    return [{"path": (table.parent / str(r["path"])).resolve(), "caption": str(r["caption"] or "").strip() or None,
             "cls": None, "class_name": None} for r in rows]


def encode_sample(index: int, entry: dict) -> dict | None:
    """One sample for the shard writer, or None when the image is missing or unreadable."""
    path = Path(entry["path"])
    try:
        data = path.read_bytes()
        with Image.open(path) as im:
            width, height = im.size
            im.verify()
    except Exception:  # a missing or broken image is left out and counted
        return None
    meta = {"width": width, "height": height, "source": path.name}
    sample = {"__key__": f"{index:09d}", IMAGE_SUFFIXES[path.suffix.lower()]: data}
    if entry["caption"]:
        sample["txt"] = entry["caption"]
    if entry["cls"] is not None:
        sample["cls"] = str(entry["cls"])
        meta["class_name"] = entry["class_name"]
    sample["json"] = json.dumps(meta)
    return sample


def write_array_records(samples: Iterator[dict], pattern: str, per_file: int) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordWriter

    paths = []
    for index, chunk in enumerate(W.chunks(samples, per_file)):
        path = pattern % index
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
        for sample in chunk:
            writer.write(W.pack_record({k: (v.encode() if isinstance(v, str) else v) for k, v in sample.items()}))
        writer.close()
        Path(path + ".tmp").replace(path)
        paths.append(path)
    return paths


def prepare(source: str, out_dir: str, *, samples_per_shard: int = 1000, name: str = "data", fmt: str = "tar",
            shuffle_seed: int | None = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards; returns {"paths", "samples", "skipped", "urls"} (skipped: the unreadable
    images and non-UTF-8 captions, whose samples are left out; urls: the pattern to put in
    config.data ... datapipeline.urls)."""
    src, out = Path(source).expanduser(), Path(out_dir).expanduser()
    if not src.exists():
        raise UserError(f"{source} does not exist")
    if samples_per_shard <= 0:
        raise UserError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    if fmt not in ("tar", "array_record"):
        raise UserError(f"--format must be tar or array_record, got {fmt!r}")
    suffix = ".tar" if fmt == "tar" else ".array_record"
    if out.exists() and any(out.glob(f"{name}-*{suffix}")) and not overwrite:
        raise UserError(f"{out} already holds {name}-*{suffix} shards (--overwrite replaces them)")
    if not src.is_dir() and src.suffix.lower() not in TABLE_SUFFIXES:
        raise UserError(f"{source} is neither a folder nor a .csv / .parquet table: give a folder of images (with "
                        "same-name .txt captions or class sub-folders) or a table of path,caption rows")
    entries = list_folder(src) if src.is_dir() else list_table(src)
    if shuffle_seed is not None:  # mix classes / folders across shards: streams read shards in order
        random.Random(shuffle_seed).shuffle(entries)
    skipped = []

    def samples() -> Iterator[dict]:
        for i, entry in enumerate(tqdm(entries, desc="packing", unit="img", disable=not progress)):
            if "bad" in entry:
                print(f"warning: {entry['bad']} is not UTF-8 text; skipping {Path(entry['path']).name}",
                      file=sys.stderr)
                skipped.append(str(entry["bad"]))
                continue
            sample = encode_sample(i, entry)
            if sample is None:
                skipped.append(str(entry["path"]))
            else:
                yield sample

    writer = W.write_tar_shards if fmt == "tar" else write_array_records
    paths = W.replace_shard_set(out, name, samples(), samples_per_shard, writer, suffix)
    if not paths:
        raise UserError(f"no readable image among the {len(entries)} listed in {source}")
    return {"paths": paths, "samples": len(entries) - len(skipped), "skipped": skipped, "urls": W.shard_urls(paths)}


def main(argv: list[str] | None = None) -> None:
    """prepare_data.py's command line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description="Pack images (+ .txt captions, class folders, or a path,caption "
        "CSV / parquet) into webdataset tar shards (or ArrayRecord files) for config.data.")
    parser.add_argument("source", help="image folder, or a .csv / .parquet table with path,caption columns")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--name", default="data", help="shard file prefix: <name>-000000.tar")
    parser.add_argument("--format", default="tar", choices=("tar", "array_record"))
    parser.add_argument("--shuffle-seed", type=int, default=0, help="order of samples across shards (-1: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of that name")
    args = parser.parse_args(argv)

    def run() -> int:
        result = prepare(args.source, args.out, samples_per_shard=args.samples_per_shard, name=args.name,
                         fmt=args.format, shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed,
                         overwrite=args.overwrite)
        print(f"wrote {result['samples']} samples in {len(result['paths'])} shards"
              + (f"; skipped {len(result['skipped'])} unreadable images or captions" if result["skipped"] else ""))
        print(f"config.data ... datapipeline.urls: {result['urls']}")
        return 0

    run_cli(run)
