"""Real MNIST digits as a captioned image-text data set: tar shards of `<key>.png` (the digit
padded to 32 x 32 with its black background) + `<key>.txt` (a caption naming the digit in one
of several wordings) + `<key>.cls`, for the CPU-sized text-to-image config (mnist_txt2img).

    python -m sgm_jax.data.mnist_captions data/mnist_txt2img          # train + test shards

Training captions use TRAIN_WORDINGS; HELD_OUT_WORDINGS never appear in the shards, so a model
that draws the right digit for them has learnt the digit's name, not a fixed sentence.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sgm_jax.data import webdataset as W

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_WORDINGS = (
    "a handwritten digit {word}",
    "the number {digit}",
    "the digit {word}",
    "a {word} written by hand",
    "handwritten {digit}",
    "the numeral {word}",
    "{word}",
    "a white {word} on black",
)
HELD_OUT_WORDINGS = (
    "a photo of the number {word}",
    "{digit}, drawn by hand",
    "an image of a {word}",
)
PAD = 2  # 28 + 2 * 2 = 32: the f4 MNIST autoencoder's input size


def caption(label: int, wording: str) -> str:
    return wording.format(word=WORDS[int(label)], digit=int(label))


def pad_digit(image: np.ndarray) -> np.ndarray:
    """[28, 28(, 1)] uint8 -> [32, 32] uint8 with the background value (0) around it."""
    return np.pad(np.asarray(image).reshape(28, 28), PAD)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out_dir: str | Path, split: str = "train", *, path: str | None = None, limit: int | None = None,
                 samples_per_shard: int = 2000, seed: int = 0) -> dict:
    """Shards `<out_dir>/<split>-NNNNNN.tar` of padded MNIST `split` digits with captions drawn
    from TRAIN_WORDINGS (deterministic per seed); returns {"urls", "samples", "paths"}."""
    from sgm_jax.data.mnist import load_mnist, resolve_mnist_source

    images, labels = load_mnist(resolve_mnist_source(path, split), split)
    order = np.random.default_rng(seed).permutation(len(labels))[:limit]
    wordings = np.random.default_rng(seed + 1).integers(0, len(TRAIN_WORDINGS), len(order))

    def samples():
        for i, (index, w) in enumerate(zip(order, wordings)):
            label = int(labels[index])
            yield {"__key__": f"{i:09d}", "png": _png(pad_digit(images[index])), "cls": str(label),
                   "txt": caption(label, TRAIN_WORDINGS[w]), "json": json.dumps({"width": 32, "height": 32})}

    out = Path(out_dir)
    paths = W.write_tar_shards(samples(), str(out / f"{split}-%06d.tar"), samples_per_shard)
    last = len(paths) - 1
    urls = str(out / f"{split}-{{000000..{last:06d}}}.tar") if last else paths[0]
    return {"urls": urls, "samples": len(order), "paths": paths}


def main(argv: list[str] | None = None) -> None:
    from sgm_jax.errors import run_cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (default: the usual places)")
    p.add_argument("--samples-per-shard", type=int, default=2000)
    args = p.parse_args(argv)

    def run() -> None:
        for split in ("train", "test"):
            info = write_shards(args.out_dir, split, path=args.mnist, samples_per_shard=args.samples_per_shard)
            print(f"{split}: {info['samples']} captioned digits -> {info['urls']}")

    run_cli(run)


if __name__ == "__main__":
    main()
