"""Real MNIST digits as a captioned image-text data set: tar shards of `<key>.png` (the digit
padded to 32 x 32 with its black background) + `<key>.txt` (a caption naming the digit, in
varied wordings) + `<key>.cls`, for the CPU-sized text-to-image config (mnist_txt2img).

    python -m sgm_jax.data.mnist_captions data/mnist_txt2img          # train + test shards

Training captions are composed by `training_caption`; HELD_OUT_WORDINGS never appear in the
shards, so a model that draws the right digit for them has learnt the digit's name, not a
fixed sentence.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sgm_jax.data import webdataset as W
from sgm_jax.data.mnist import load_mnist, resolve_mnist_source
from sgm_jax.errors import run_cli

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions are composed: a frame around a phrase naming the digit, sometimes with a
# distractor word from the CLIP vocabulary. That puts the digit's name at many token positions
# among many other words, so the text tower learns which token names the digit rather than
# where it sits; the held-out wordings below then test unseen sentences, not unseen positions.
DIGIT_PHRASES = (
    "{word}", "{digit}", "a {word}", "the {word}", "the digit {word}", "the digit {digit}", "the number {word}",
    "the number {digit}", "the numeral {word}", "a handwritten {word}", "a handwritten digit {word}",
    "handwritten {digit}", "a white {word}", "digit {digit}", "number {word}", "a small {word}", "a large {digit}",
    "a neat {word}", "a messy {word}", "a thin {digit}", "a bold {word}", "a slanted {word}", "a single {digit}",
)
FRAMES = (
    "{x}", "{x}", "{x}", "here is {x}", "this is {x}", "look at {x}", "a picture showing {x}", "a scan of {x}",
    "a sketch of {x}", "a drawing of {x}", "someone wrote {x}", "{x} written by hand", "{x} on black",
    "{x} on a black background", "{x} in white ink", "{x} from the mnist set", "{x} written with a pen",
    "we see {x} here", "a student wrote {x} on the page", "scanned {x} in grey", "a close up of {x}",
)
# Words of the held-out wordings that no training caption contains (tests check it), so
# the held-out captions hold words the model never saw, besides being unseen sentences.
HELD_OUT_WORDINGS = (
    "a photo of the number {word}",
    "{digit}, drawn by hand",
    "an image of a {word}",
)
HELD_OUT_ONLY_WORDS = ("photo", "drawn", "an", "image", ",")
DISTRACTOR_RATE = 0.3  # fraction of training captions with one random vocabulary word inserted
PAD = 2  # 28 + 2 * 2 = 32: the f4 MNIST autoencoder's input size


# number words besides the digit names (which `distractor_words` also keeps out, inside other words)
_NUMBER_WORDS = frozenset(
    "ten eleven twelve thirteen fifteen twenty thirty forty fifty hundred thousand million billion dozen first "
    "second third fourth fifth sixth seventh eighth ninth tenth single double triple twice thrice once none "
    "digit digits number numbers numeral numerals".split())


def caption(label: int, wording: str) -> str:
    return wording.format(word=WORDS[int(label)], digit=int(label))


def distractor_words(tokenizer=None) -> tuple[str, ...]:
    """Whole words of the CLIP BPE vocabulary that say nothing about a digit: lower-case ASCII
    letters, 3-10 long, no digit name inside, no number word, no held-out-only word."""
    # transformers is heavy and, without torch, prints a line on import: only text models need it
    from sgm_jax.nn.tokenizer import load_tokenizer

    vocab = (tokenizer or load_tokenizer()).get_vocab()
    words = {t[:-4] for t in vocab if t.endswith("</w>")}
    keep = (w for w in words if 3 <= len(w) <= 10 and w.isascii() and w.isalpha() and w.islower()
            and w not in _NUMBER_WORDS and w not in HELD_OUT_ONLY_WORDS and not any(d in w for d in WORDS))
    return tuple(sorted(keep))


def training_caption(label: int, rng: np.random.Generator, distractors: tuple[str, ...] = ()) -> str:
    """A caption naming digit `label`: a random DIGIT_PHRASES inside a random FRAMES, and with
    probability DISTRACTOR_RATE one word of `distractors` inserted at a random word boundary."""
    phrase = DIGIT_PHRASES[rng.integers(len(DIGIT_PHRASES))]
    text = FRAMES[rng.integers(len(FRAMES))].format(x=caption(label, phrase))
    if distractors and rng.random() < DISTRACTOR_RATE:
        words = text.split(" ")
        words.insert(int(rng.integers(len(words) + 1)), distractors[rng.integers(len(distractors))])
        text = " ".join(words)
    return text


def pad_digit(image: np.ndarray) -> np.ndarray:
    """[28, 28(, 1)] uint8 -> [32, 32] uint8 with the background value (0) around it."""
    return np.pad(np.asarray(image).reshape(28, 28), PAD)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out_dir: str | Path, split: str = "train", *, path: str | None = None, limit: int | None = None,
                 samples_per_shard: int = 2000, seed: int = 0) -> dict:
    """Shards `<out_dir>/<split>-NNNNNN.tar` of padded MNIST `split` digits with captions from
    `training_caption` (deterministic per seed); returns {"urls", "samples", "paths"}."""

    images, labels = load_mnist(resolve_mnist_source(path, split), split)
    order = np.random.default_rng(seed).permutation(len(labels))[:limit]
    rng, distractors = np.random.default_rng(seed + 1), distractor_words()

    def samples():
        for i, index in enumerate(order):
            label = int(labels[index])
            yield {"__key__": f"{i:09d}", "png": _png(pad_digit(images[index])), "cls": str(label),
                   "txt": training_caption(label, rng, distractors), "json": json.dumps({"width": 32, "height": 32})}

    paths = W.replace_shard_set(out_dir, split, samples(), samples_per_shard)
    return {"urls": W.shard_urls(paths), "samples": len(order), "paths": paths}


def main(argv: list[str] | None = None) -> None:
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
