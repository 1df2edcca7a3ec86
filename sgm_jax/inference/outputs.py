"""Where sampled images go: output paths checked before sampling, PNGs with text metadata, grids,
and the seed's invisible watermark on every image saved (unless turned off)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from sgm_jax.errors import UserError
from sgm_jax.images import legible_scale, make_grid, save_png

from .watermark import STAMP_NAME, embed_watermark, fits

MAX_GRID = 1024  # images in one grid PNG (a grid is held in memory whole; folders are written as they come)
UNSTAMPED = "none (--no-watermark)"  # the "watermark" text field of a PNG saved with the stamp turned off


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


def _unstampable(shape: tuple[int, ...]) -> str | None:
    """Why images of `shape` [H, W, C] cannot take the stamp ("28x28, too small"), or None when they can."""
    h, w, c = shape
    if not fits(h, w):
        return f"{h}x{w}, too small"
    # the stamp lives in the U (blue-difference) plane: a greyscale image has none to carry it
    return None if c == 3 else f"{h}x{w}, greyscale"


@dataclass
class Watermark:
    """The seed's invisible watermark (sgm_jax.inference.watermark) on every image saved, as the seed
    stamps every sample it saves; off with enabled=False (sample.py / sgm-demo --no-watermark).

    Images it cannot take (under 256x256 pixels, which imwatermark refuses, e.g. an MNIST workdir's
    28x28 samples; or greyscale) are saved as they are, and `say` is told so once for each such size:
    one line per run, never a failure. A PNG's "watermark" text field says which it got."""

    enabled: bool = True
    say: Callable[[str], None] = print
    _told: set[str] = field(default_factory=set, repr=False)

    def apply(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        """uint8 [N, H, W, C] -> (the images, stamped if they can be; the "watermark" text field's value)."""
        if not self.enabled:
            return images, UNSTAMPED
        if len(images) == 0:  # a host's empty share of a grid (only process 0 saves it)
            return images, STAMP_NAME
        reason = _unstampable(images.shape[1:])
        if reason is None:
            return embed_watermark(images), STAMP_NAME
        if reason not in self._told:
            self._told.add(reason)
            self.say(f"watermark: images saved unstamped ({reason}): the seed's invisible watermark needs RGB "
                     "images of 256x256 pixels or more")
        return images, f"none ({reason})"


def save_images(images: np.ndarray, paths: Sequence[Path], metadata: Mapping[str, Any],
                captions: Sequence[str] = (), first: int = 0, watermark: Watermark | None = None) -> list[Path]:
    """uint8 [N, H, W, C] -> PNGs with text metadata (plus each image's index in the request, its caption
    and whether it carries the watermark), stamped first (`watermark`; default: on)."""
    images, stamp = (watermark if watermark is not None else Watermark()).apply(images)
    out = []
    for i, (img, path) in enumerate(zip(images, paths)):
        meta = {**metadata, "index": first + i, **({"condition": captions[i]} if captions else {}), "watermark": stamp}
        out.append(save_png(to_pil(img), path, meta))
    return out


def save_grid(images: np.ndarray, path: Path, per_row: int, metadata: Mapping[str, Any],
              captions: Sequence[str] = (), watermark: Watermark | None = None) -> Path:
    """uint8 [N, H, W, C] -> one PNG, `per_row` tiles a row (the images of one class / prompt), labelled.
    Each tile is stamped before the grid is assembled (as the seed stamps samples), so each carries it."""
    images, stamp = (watermark if watermark is not None else Watermark()).apply(images)
    grid = make_grid(np.asarray(images, np.uint8), per_row, labels=list(captions) if captions else None,
                     scale=legible_scale(images.shape[1]))
    return save_png(grid, path, {**metadata, "images": len(images), "watermark": stamp})


VIDEO_SUFFIXES = (".mp4", ".gif")


def video_path(out: str | os.PathLike, prefix: str) -> Path:
    """Where a video goes, checked before sampling: `out` an .mp4 (imageio's ffmpeg plugin) or a .gif
    file, or a folder for one PNG per frame (<out>/<prefix>_<i>.png)."""
    target = Path(out).expanduser()
    if target.suffix.lower() in VIDEO_SUFFIXES:
        if target.is_dir():
            raise UserError(f"--out {target} is a folder; give a file name or the folder without {target.suffix}")
        _writable_ancestor(target.parent)
        if target.suffix.lower() == ".mp4":
            try:
                import imageio_ffmpeg  # noqa: F401  (optional: the [video] extra)
            except ImportError:
                raise UserError(f"--out {target}: writing mp4 needs imageio's ffmpeg plugin "
                                "(pip install 'imageio[ffmpeg]'); or give a .gif or a folder for PNG frames") from None
        return target
    if target.suffix.lower() == ".png" or (target.exists() and not target.is_dir()):
        raise UserError(f"--out {target}: a video is an .mp4 or .gif file, or a folder for PNG frames")
    _writable_ancestor(target)
    return target


def save_video(frames: np.ndarray, target: Path, fps: int, metadata: Mapping[str, Any], prefix: str,
               watermark: Watermark | None = None) -> list[Path]:
    """uint8 [T, H, W, 3] -> an mp4 / gif at `fps` frames per second, or PNG frames (with text
    metadata) in a folder; stamped first, frame by frame, as the seed's simple_video_sample."""
    suffix = target.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        paths = [target / f"{prefix}_{i:03d}.png" for i in range(len(frames))]
        return save_images(np.asarray(frames, np.uint8), paths, {**metadata, "fps": fps}, watermark=watermark)
    frames, _ = (watermark if watermark is not None else Watermark()).apply(np.asarray(frames, np.uint8))
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        import imageio.v2 as imageio  # optional: the [video] extra

        imageio.mimwrite(target, list(frames), fps=fps)
        return [target]
    first, *rest = [to_pil(f) for f in frames]
    first.save(target, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    return [target]
