"""The seed's invisible watermark: the 48-bit "dwtDct" stamp, embedded and read back without torch.

The seed (sgm/inference/helpers.py, `WatermarkEmbedder`) stamps every image it saves through the
invisible-watermark package (`imwatermark`), whose import pulls in torch (its rivaGan module). This
is that package's `EmbedMaxDct` (method "dwtDct", its default scales [0, 36, 36], 4x4 blocks) in
numpy + PyWavelets, bit for bit:

  1. RGB -> cv2's BGR2YUV. Float images as the seed feeds them (float32, 0..255; U and V offset by
     0.5) with cv2's fused multiply-adds; uint8 images (what the seed's detect.py reads back with
     cv2.imread) in cv2's 14-bit fixed point.
  2. One level Haar DWT (pywt.dwt2) of the U channel, cropped to multiples of 4 px. The package
     loops over Y and U only; Y's scale is 0, so U is the only channel stamped (V never is).
  3. The approximation band in 4x4 blocks, row-major; block k carries bit k % 48. In each block the
     coefficient of largest magnitude, the top-left one excluded, is quantised:
     |c| -> (|c| // 36 + 0.25 + 0.5 * bit) * 36, keeping its sign. (No DCT is taken: the
     package's `diffuse_dct_matrix` works on the wavelet coefficients themselves.)
  4. Inverse DWT with the horizontal and vertical detail bands swapped, as the package passes them,
     written back into U; YUV -> BGR -> RGB.
Reading takes the same block and coefficient: bit = (|c| mod 36) > 18, averaged over the blocks of
each bit, 1 when the mean is above 127/255.

How well the stamp reads back depends on the image, in the seed as here: a block whose peak is
quantised down below its neighbour loses its vote, and the seed writes in float YUV (U offset 0.5)
but its detect.py reads PNGs in uint8 YUV (offset 128, 255 in the wavelet band), which inverts the
votes of blocks with negative U. So some photos read back 48/48 and others near chance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pywt
from PIL import Image

from sgm_jax.errors import run_cli

# The seed's fixed 48-bit message ("choosen at random"), 0xB3EC907BB19E, most significant bit first.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = np.array([int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]], dtype=np.uint8)

SCALE = 36          # imwatermark's default scale for U
BLOCK = 4           # block side in the approximation band (8 px of the image)
MIN_PIXELS = 256 * 256  # imwatermark refuses smaller images
_LANES = 8          # float32 lanes of cv2's AVX2 colour kernel; a row's last W % 8 pixels take its scalar
                    # path in cv2 4.6 (the seed's pin) and 5.0

# The seed's detect.py verdicts: at most this many matching bits (of 48) -> this verdict.
MATCH_VALUES = ((27, "no watermark detected"),
                (33, "partial watermark match; cannot determine with certainty"),
                (35, "likely watermarked (the seed's test: 0.02% of real images were falsely so)"),
                (48, "very likely watermarked (the seed's test: no real image was falsely so)"))

# What a saved PNG's "watermark" text field says when its pixels carry the stamp.
STAMP_NAME = "sgm dwtDct 48-bit"

_F = np.float32


def _fma(a: np.ndarray, b: float, c: np.ndarray | float) -> np.ndarray:
    """float32 a * b + c rounded once, as cv2's SIMD kernels compute it (b, c taken as float32).

    The float32 product is exact in float64; the sum rounds twice (to 53, then 24 bits), which can
    differ from one rounding only where the float64 sum falls exactly half-way between two float32s.
    """
    return (a.astype(np.float64) * np.float64(_F(b)) + np.asarray(c, _F).astype(np.float64)).astype(_F)


def _bgr_to_yuv_float(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [H, W, 3] BGR, 0..255 -> Y, U, V [H, W] as cv2.cvtColor(COLOR_BGR2YUV) gives them."""
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    y = _fma(b, 0.114, _fma(g, 0.587, r * _F(0.299)))
    tail = bgr.shape[1] - bgr.shape[1] % _LANES  # cv2's scalar loop sums in another order
    if tail < bgr.shape[1]:
        bt, gt, rt = b[:, tail:], g[:, tail:], r[:, tail:]
        y[:, tail:] = _fma(rt, 0.299, _fma(bt, 0.114, gt * _F(0.587)))
    u = _fma(b - y, 0.492, 0.5)  # cv2's chroma offset for float images, whatever their range
    v = _fma(r - y, 0.877, 0.5)
    return y, u, v


def _yuv_to_bgr_float(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(COLOR_YUV2BGR) for float32 planes -> [H, W, 3] BGR."""
    u, v = u - _F(0.5), v - _F(0.5)
    return np.stack([_fma(u, 2.032, y), _fma(v, -0.581, _fma(u, -0.395, y)), _fma(v, 1.140, y)], axis=-1)


def _u_uint8(bgr: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] BGR -> the U plane of cv2's BGR2YUV (fixed point: 14 fraction bits, rounded)."""
    b, g, r = (bgr[..., k].astype(np.int32) for k in range(3))
    y = (r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14
    return np.clip(((b - y) * 8061 + (128 << 14) + (1 << 13)) >> 14, 0, 255).astype(np.uint8)


def _peaks(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approximation band [h, w] -> (row, col) [nh * nw] of each whole 4x4 block's largest |coefficient|,
    the top-left one excluded; blocks in row-major order, as the package visits them."""
    nh, nw = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    flat = band[:nh * BLOCK, :nw * BLOCK].reshape(nh, BLOCK, nw, BLOCK).swapaxes(1, 2).reshape(nh, nw, -1)
    pos = np.argmax(np.abs(flat[..., 1:]), axis=-1) + 1  # argmax takes the first of equals, as the package does
    i, j = np.indices((nh, nw))
    return (i * BLOCK + pos // BLOCK).reshape(-1), (j * BLOCK + pos % BLOCK).reshape(-1)


def fits(height: int, width: int) -> bool:
    """Whether an image of height x width pixels takes the stamp: imwatermark's 256 x 256 pixels at
    least, and a whole 8x8 block for each of the 48 bits."""
    return height * width >= MIN_PIXELS and (height // 8) * (width // 8) >= len(WATERMARK_BITS)


def _check(shape: tuple[int, ...]) -> None:
    """ValueError unless `shape` is one RGB image [H, W, 3] large enough for the stamp."""
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"watermark: expected an RGB image [H, W, 3] (or a batch [B, H, W, 3]), got shape {shape}")
    h, w = shape[:2]
    if not fits(h, w):
        raise ValueError(f"watermark: image {h}x{w} is too small; the stamp needs 256x256 pixels or more "
                         "(and 48 whole 8x8 blocks)")


def _embed_bgr(bgr: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """imwatermark's EmbedMaxDct.encode: float32 [H, W, 3] BGR 0..255 -> the same, stamped."""
    y, u, v = _bgr_to_yuv_float(bgr)
    h4, w4 = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    ca, (ch, cv, cd) = pywt.dwt2(u[:h4, :w4], "haar")
    rows, cols = _peaks(ca)
    vals = ca[rows, cols]
    bit = bits[np.arange(vals.size) % len(bits)]
    # float32 scalar arithmetic in the package (numpy >= 2); every step is exact at these magnitudes
    quantised = (np.abs(vals) // SCALE + _F(0.25) + _F(0.5) * bit.astype(_F)) * _F(SCALE)
    ca[rows, cols] = np.where(vals >= 0, quantised, -quantised)
    # the package hands idwt2 (cV, cH, cD) for pywt's (cH, cV, cD): its image carries the swap, so ours does
    u = u.copy()
    u[:h4, :w4] = pywt.idwt2((ca, (cv, ch, cd)), "haar")
    return _yuv_to_bgr_float(y, u, v)


def _read_bgr(bgr: np.ndarray, n: int) -> np.ndarray:
    """imwatermark's EmbedMaxDct.decode: BGR [H, W, 3] (uint8, or float32 0..255) -> bool bits [n]."""
    u = _u_uint8(bgr) if bgr.dtype == np.uint8 else _bgr_to_yuv_float(bgr)[1]
    h4, w4 = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    ca = pywt.dwt2(u[:h4, :w4], "haar")[0]  # float64 from uint8 U, float32 from float U, as in the package
    rows, cols = _peaks(ca)
    votes = np.abs(ca[rows, cols]) % SCALE > 0.5 * SCALE
    which = np.arange(votes.size) % n
    mean = np.bincount(which, weights=votes, minlength=n) / np.bincount(which, minlength=n)
    return mean * 255 > 127


def _batched(images: np.ndarray) -> tuple[np.ndarray, bool]:
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or not (batch.dtype == np.uint8 or batch.dtype.kind == "f"):
        raise ValueError("watermark: expected uint8 or float RGB images [H, W, 3] or [B, H, W, 3], "
                         f"got {images.dtype} {images.shape}")
    _check(batch.shape[1:])  # a batch shares one size
    return batch, single


def embed_watermark(images: np.ndarray, bits: np.ndarray = WATERMARK_BITS) -> np.ndarray:
    """Stamp RGB images [B, H, W, 3] (or one [H, W, 3]) with the seed's watermark; same shape and dtype.

    float images are in [0, 1], like the seed's `embed_watermark` takes them: -> float32 * 255, BGR,
    stamped, / 255, clamped to [0, 1]. uint8 images give what the seed saves for the sample u / 255:
    that float result * 255, truncated to uint8 (its `perform_save_locally`), so unstamped pixels can
    drop by one level, as in the seed's PNGs.
    """
    batch, single = _batched(images)
    bits = np.asarray(bits, dtype=np.uint8) % 2
    x = batch.astype(_F) / _F(255) if batch.dtype == np.uint8 else batch.astype(_F)
    out = np.empty_like(x)
    for k, image in enumerate(x * _F(255)):
        out[k] = _embed_bgr(np.ascontiguousarray(image[..., ::-1]), bits)[..., ::-1]
    out = np.clip(out / _F(255), _F(0), _F(1))
    out = (out * _F(255)).astype(np.uint8) if batch.dtype == np.uint8 else out.astype(batch.dtype)
    return out[0] if single else out


def read_watermark(images: np.ndarray, num_bits: int = len(WATERMARK_BITS)) -> np.ndarray:
    """The bits read from RGB images: bool [B, num_bits] (or [num_bits] for one [H, W, 3] image).

    uint8 images are read as the seed's detect.py reads a PNG (cv2.imread: uint8 BGR); float images
    in [0, 1] as the stamping saw them (float32 * 255).
    """
    batch, single = _batched(images)
    bgr = batch[..., ::-1] if batch.dtype == np.uint8 else batch.astype(_F)[..., ::-1] * _F(255)
    bits = np.zeros((len(bgr), num_bits), bool)
    for k, image in enumerate(bgr):
        bits[k] = _read_bgr(np.ascontiguousarray(image), num_bits)
    return bits[0] if single else bits


def matches(images: np.ndarray, bits: np.ndarray = WATERMARK_BITS) -> np.ndarray | float:
    """Fraction of the 48 bits that agree with the seed's watermark: 1.0 stamped, about 0.5 for any
    other image. A float for one image, float [B] for a batch."""
    bits = (np.asarray(bits) % 2).astype(bool)
    fraction = (read_watermark(images, len(bits)) == bits).mean(axis=-1)
    return float(fraction) if np.ndim(fraction) == 0 else fraction


def verdict(fraction: float) -> str:
    """The seed's detect.py verdict for a match fraction."""
    count = round(fraction * len(WATERMARK_BITS))
    return next(text for most, text in MATCH_VALUES if count <= most)


def main(argv: list[str] | None = None) -> None:
    """python -m sgm_jax.inference.watermark IMAGE... -> each image's match fraction and verdict."""
    parser = argparse.ArgumentParser(description="How many of the seed's 48 watermark bits an image carries")
    parser.add_argument("images", nargs="+", help="image files (PNG as saved; resizing or JPEG loses the stamp)")
    args = parser.parse_args(argv)

    def run() -> None:
        for name in args.images:
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except OSError as e:  # PIL.UnidentifiedImageError, truncated files
                raise ValueError(f"{path}: not an image file that PIL can read") from e
            fraction = matches(image)
            print(f"{path}: {fraction:.3f} of the watermark's bits match "
                  f"({round(fraction * len(WATERMARK_BITS))}/{len(WATERMARK_BITS)}): {verdict(fraction)}")

    run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
