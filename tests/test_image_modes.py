"""Every image mode PIL opens decodes to its real 8-bit values (against a numpy reference per mode)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sgm_jax.data import transforms as T

RNG = np.random.default_rng(0)


def _encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit grey ([H, W]) or RGB ([H, W, 3]) PNG, written by hand (PIL cannot write 16-bit RGB)."""
    h, w = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if values.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _decoded(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(T.decode({"__key__": "x", "png": data}, mode)["jpg"]).astype(np.int64)


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(colour * a + 255.0 * (1.0 - a)).astype(np.int64)


def test_16_bit_grey_png_keeps_its_75_levels():
    grey = (np.arange(75, dtype=np.uint16) * 880).reshape(5, 15)
    assert Image.open(io.BytesIO(_png16(grey))).mode == "I;16"
    assert np.array_equal(_decoded(_png16(grey)), _rgb(grey >> 8))
    assert np.array_equal(_decoded(_png16(grey), "L"), grey >> 8)
    assert len(np.unique(_decoded(_png16(grey), "L"))) == 75


def test_16_bit_rgb_png():
    rgb = RNG.integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    assert np.array_equal(_decoded(_png16(rgb)), rgb >> 8)


def test_32_bit_integer_grey():
    values = RNG.integers(-1000, 70000, (6, 7)).astype(np.int32)
    data = _encoded(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.array_equal(_decoded(data), _rgb(np.clip(values, 0, 65535) >> 8))


def test_float_grey_in_0_1():
    values = RNG.random((6, 7)).astype(np.float32)
    data = _encoded(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.array_equal(_decoded(data), _rgb(np.round(values * 255).astype(np.int64)))


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_over_white(mode):
    channels = RNG.integers(0, 256, (6, 7, len(mode))).astype(np.uint8)
    channels[0, :, -1] = 0  # fully transparent: white, whatever colour the pixels hold
    colour = _rgb(channels[..., 0]) if mode == "LA" else channels[..., :3]
    got = _decoded(_encoded(Image.fromarray(channels)))
    assert np.abs(got - _over_white(colour.astype(np.int64), channels[..., -1])).max() <= 1
    assert (got[0] == 255).all()


def test_palette_with_a_transparent_index():
    palette = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    index = RNG.integers(0, 16, (6, 7)).astype(np.uint8)
    image = Image.fromarray(index).convert("P")
    image.putpalette(palette.tobytes())
    data = _encoded(image, transparency=3)
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.where((index == 3)[..., None], 255, palette[index].astype(np.int64))
    assert np.array_equal(_decoded(data), expected)


def test_cmyk():
    cmyk = RNG.integers(0, 256, (6, 7, 4)).astype(np.uint8)
    data = _encoded(Image.frombytes("CMYK", (7, 6), cmyk.tobytes()), "TIFF")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255 - c) * (255 - k) / 255)
    assert np.abs(_decoded(data) - expected).max() <= 1
