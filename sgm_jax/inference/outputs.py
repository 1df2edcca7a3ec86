"""Where sampled images go: output paths checked before sampling, PNGs with text metadata, grids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from sgm_jax.errors import UserError

MAX_GRID = 1024  # images in one grid PNG (a grid is held in memory whole; folders are written as they come)


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, 3] or [H, W, 1] -> an RGB / greyscale PIL image."""
    image = np.asarray(image)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _writable_ancestor(path: Path) -> None:
    """UserError unless `path` can be created: its nearest existing ancestor is a writable folder."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: folder {probe} is not writable")


def output_paths(out: str | os.PathLike, count: int, prefix: str) -> tuple[list[Path], Path | None]:
    """(one path per image, grid path or None), checked writable; nothing is created yet.

    `out` a folder: <out>/<prefix>_<i>.png for each image. `out` a .png: that file when there
    is one image, else a grid of all of them there (one row per class / prompt).
    """
    target = Path(out).expanduser()
    if target.suffix.lower() == ".png":
        if target.is_dir():
            raise UserError(f"--out {target} is a folder; give a .png file name or the folder without .png")
        _writable_ancestor(target.parent)
        if count > MAX_GRID:
            raise UserError(f"--out {target}: a grid of {count} images is too large (at most {MAX_GRID}); "
                            "give a folder for one PNG per image")
        return ([target], None) if count == 1 else ([], target)
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} is a file; give a folder or a .png path")
    _writable_ancestor(target)
    return [target / f"{prefix}_{i:03d}.png" for i in range(count)], None


def save_images(images: np.ndarray, paths: Sequence[Path], metadata: Mapping[str, Any],
                captions: Sequence[str] = (), first: int = 0) -> list[Path]:
    """uint8 [N, H, W, C] -> PNGs with text metadata (plus each image's index in the request and caption)."""
    from sgm_jax.images import save_png

    out = []
    for i, (img, path) in enumerate(zip(images, paths)):
        meta = {**metadata, "index": first + i, **({"condition": captions[i]} if captions else {})}
        out.append(save_png(to_pil(img), path, meta))
    return out


def save_grid(images: np.ndarray, path: Path, per_row: int, metadata: Mapping[str, Any],
              captions: Sequence[str] = ()) -> Path:
    """All images in one PNG, `per_row` tiles a row (the images of one class / prompt), labelled."""
    from sgm_jax.images import legible_scale, make_grid, save_png

    grid = make_grid(np.asarray(images, np.uint8), per_row, labels=list(captions) if captions else None,
                     scale=legible_scale(images.shape[1]))
    return save_png(grid, path, {**metadata, "images": len(images)})
