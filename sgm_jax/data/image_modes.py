"""PIL images of every mode PIL opens -> the 8-bit "RGB" / "L" images the model trains on.

PIL's own `convert` clips 16- and 32-bit grey (I;16, I) and float (F) images at 255, which
turns a 16-bit PNG into two or three grey levels, and drops alpha (LA, RGBA, PA, P or RGB
with a transparent colour), showing whatever colour the transparent pixels happen to hold.
Here each mode keeps its real values:

  * I;16, I;16B, I;16L, I: the 16-bit range, v >> 8 (the high byte: what PIL itself keeps of
    a 16-bit RGB PNG); I is clipped to 0 ... 65535 first;
  * F: the [0, 1] range of float images, round(v * 255), clipped (NaN -> 0);
  * transparency: composited over white (img2dataset's rule), then converted;
  * CMYK, YCbCr, 1, L, RGB, ...: PIL's conversion, which is exact for them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def to_mode(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """`image` in `mode` ("RGB", "L", ...), converted as the module docstring says."""
    if image.mode == mode:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float32), nan=0.0)
        image = Image.fromarray(np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8))
    elif has_transparency(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == mode else image.convert(mode)
