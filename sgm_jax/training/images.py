"""Sample grids as PNG, with optional per-tile labels (e.g. the class asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> uint8 [N, H, W, C]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, labels: Sequence[str] | None = None, scale: int = 1,
              pad: int = 2) -> Image.Image:
    """images: [N, H, W, C] in [-1, 1] -> one RGB image, `nrow` tiles per row, labels above tiles."""
    tiles = to_uint8(images)
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    n, h, w, _ = tiles.shape
    h, w = h * scale, w * scale
    label_h = 12 if labels is not None else 0
    rows = -(-n // nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad + label_h) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (w + pad), pad + r * (h + pad + label_h)
        if labels is not None:
            draw.text((x0 + 1, y0), str(labels[i]), fill=(255, 220, 0))
        grid.paste(Image.fromarray(tile).resize((w, h), Image.NEAREST), (x0, y0 + label_h))
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write atomically (tmp file + rename) with text metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path
