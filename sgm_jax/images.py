"""Sample grids as PNG, with optional per-tile labels (e.g. the class asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from sgm_jax.errors import UserError


def to_uint8(images: Any) -> Any:
    """[N, H, W, C] in [-1, 1] -> uint8, as the seed saves samples and grids: clamp((x + 1) / 2) * 255,
    truncated. numpy in, numpy out; a jax array (inside jit too) stays one."""
    xp = jnp if isinstance(images, jax.Array) else np
    unit = xp.clip((xp.asarray(images).astype(xp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return xp.floor(255.0 * unit).astype(xp.uint8)


LINE_H, MAX_LINES = 11, 4


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """text as lines no wider than `width` pixels (words split only when one alone is wider),
    at most MAX_LINES: a prompt fits under a 32-pixel MNIST tile as under a 1024-pixel one."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while draw.textlength(word) > width and len(word) > 1:
            cut = max(k for k in range(1, len(word) + 1) if k == 1 or draw.textlength(word[:k]) <= width)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES]
        lines[-1] = lines[-1][:-2] + ".."
    return lines


def legible_scale(height: int) -> int:
    """How many times a grid enlarges its tiles: twice up to 64 px (MNIST, CIFAR), else once."""
    return 2 if height <= 64 else 1


def make_grid(images: np.ndarray, nrow: int, labels: Sequence[str] | None = None, scale: int = 1,
              pad: int = 2) -> Image.Image:
    """images: [N, H, W, C] in [-1, 1] (or uint8 as saved) -> one RGB image, `nrow` tiles per row,
    labels above tiles (wrapped to the tile's width), tiles enlarged `scale` times."""
    images = np.asarray(images)
    tiles = images if images.dtype == np.uint8 else to_uint8(images)
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    n, h, w, _ = tiles.shape
    h, w = h * scale, w * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, str(label), w - 2) for label in labels] if labels is not None else None
    label_h = LINE_H * max(1, *(len(x) for x in wrapped)) + 1 if wrapped is not None else 0
    rows = -(-n // nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad + label_h) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (w + pad), pad + r * (h + pad + label_h)
        for k, line in enumerate(wrapped[i] if wrapped is not None else ()):
            draw.text((x0 + 1, y0 + k * LINE_H), line, fill=(255, 220, 0))
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
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    except OSError as e:  # a full disk: one line, and no partial file left behind
        tmp.unlink(missing_ok=True)
        raise UserError(f"writing {path} failed: {e.strerror or e} (disk full or not writable?); nothing was "
                        "written there", exit_code=3) from None
    return path
