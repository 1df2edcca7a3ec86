"""Image sets for evaluation: folders of image files, data-set splits, and the conditioning
(class ids or prompts) that goes with each image.

Folder images are read in sorted file-name order as RGB uint8 (PIL's `convert("RGB")`, as
pytorch-fid's loader); a PNG's text metadata `prompt` or `class` (written by sample.py and
evaluate.py) gives its conditioning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgm_jax.data import DATASETS, build_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: not a folder of images")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image_folder(directory: str | os.PathLike, limit: int | None = None) -> tuple[np.ndarray, list[Any]]:
    """(uint8 `[N, H, W, 3]`, conditioning per image: the PNG's `class` (int) or `prompt`
    text metadata, else None). All images must have one size."""
    from PIL import Image

    files = list_images(directory)[:limit]
    images, conditioning, sizes = [], [], {}
    for path in files:
        with Image.open(path) as im:
            info = dict(getattr(im, "text", {}) or {})
            array = np.asarray(im.convert("RGB"))
        sizes.setdefault(array.shape[:2], path.name)
        images.append(array)
        if "class" in info:
            conditioning.append(int(info["class"]))
        else:
            conditioning.append(info.get("prompt"))
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({name})" for (h, w), name in list(sizes.items())[:3])
        raise ValueError(f"{directory}: images differ in size: {shown}; resize them to one size first")
    return np.stack(images), conditioning


def save_image_folder(directory: str | os.PathLike, images: np.ndarray, conditioning: Sequence[Any] | None = None,
                      prefix: str = "", start: int = 0) -> list[Path]:
    """Write uint8 `[N, H, W, C]` (or float in [-1, 1]) as PNGs `<prefix>000000.png`, ... (numbered
    from `start`); the conditioning goes into each PNG's text metadata (`class` or `prompt`)."""
    from PIL import Image, PngImagePlugin

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    paths = []
    for i, image in enumerate(images):
        meta = PngImagePlugin.PngInfo()
        cond = None if conditioning is None else conditioning[i]
        if cond is not None:
            meta.add_text("class" if isinstance(cond, (int, np.integer)) else "prompt", str(cond))
        path = directory / f"{prefix}{start + i:06d}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, pnginfo=meta)
        paths.append(path)
    return paths


def load_split(ref: str, limit: int | None = None) -> tuple[np.ndarray, list[Any]]:
    """`"mnist:test"`, `"cifar10:train"`, ... (optionally `"mnist:test:/path/to/data"`): the split's
    uint8 images and class ids, from the same sources training reads."""

    name, _, rest = ref.partition(":")
    split, _, path = rest.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown reference {ref!r}: a folder, a .npz of FID statistics, or <dataset>:<split> "
                         f"with dataset in {sorted(DATASETS)}")
    data = build_dataset(name, path=path or None, split=split or "test")
    n = len(data) if limit is None else min(int(limit), len(data))
    return data.images[:n], [int(c) for c in data.labels[:n]]


def is_split_reference(ref: str) -> bool:
    """True for `<dataset>:<split>` references (not a path that exists)."""
    return ":" in str(ref) and not Path(ref).exists() and not str(ref).endswith(".npz")
