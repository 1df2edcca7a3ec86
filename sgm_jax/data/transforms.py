"""Per-sample decoding and the seed's image transforms, as pure functions of (sample, rng).

A sample is a dict. Raw samples (from a tar shard or a record) map extensions to bytes
("jpg", "png", "webp", "txt", "cls", "json") or hold already-decoded arrays (tfds). `decode`
turns one into {"jpg": PIL image, "txt": str, "cls": int, "json": dict}; the transform steps
then follow the seed's `postprocessors` (its sdata mappers and torchvision transforms):

    Resize(size, interpolation=3)   shorter side to `size` (bicubic, PIL, as torchvision does
                                    for PIL input); a pair (h, w) resizes to exactly that
    CenterCrop(size) / RandomCrop(size) / RandomHorizontalFlip(p)
    ToTensor                        uint8 -> float32 in [0, 1], kept HWC (NHWC inside)
    Rescaler(isfloat=True)          x * 2 - 1 (isfloat False: x / 127.5 - 1)
    AddOriginalImageSizeAsTupleAndCropToSquare(h_key, w_key, use_data_key, data_key)
        original_size_as_tuple = (json[h_key], json[w_key]) (the decoded size when the json
        lacks them), then a square crop of the shorter side at a random (top, left) with
        top in [0, H - s], left in [0, W - s], recorded as crop_coords_top_left; our
        `crop="center"` parameter centres it instead (torchvision's CenterCrop rounding).

Every sample finally gets target_size_as_tuple = its (H, W). With aspect buckets (SDXL's
multi-aspect training) `Resize` scales the image to cover the bucket nearest its aspect
ratio and the crop-to-square step crops to that bucket instead of a square.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sgm_jax.data.image_modes import to_mode

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CLASS_JSON_KEYS = ("cls", "class", "label")
Step = Callable[[dict, np.random.Generator], dict]


class BadSample(Exception):
    """A sample that cannot be used (undecodable image, missing key); `kind` names the counter."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------- decoding


def decode(raw: dict, mode: str = "RGB", required: Sequence[str] = ("jpg",)) -> dict:
    """Raw sample -> {"jpg": PIL image in `mode`, "txt", "cls", "json", "__decoded_size__": (h, w)}.

    Raises BadSample("undecodable_image" | "missing_<key>") for samples the batch cannot use.
    """
    out: dict[str, Any] = {k: raw[k] for k in ("__key__", "__url__") if k in raw}
    meta = raw.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            raise BadSample("bad_json", "its .json metadata is not JSON") from None
    out["json"] = meta if isinstance(meta, dict) else {}
    image = next((raw[e] for e in IMAGE_EXTENSIONS + ("image",) if e in raw), None)
    if image is not None:
        try:
            if isinstance(image, (bytes, bytearray, memoryview)):
                pil = Image.open(io.BytesIO(image))
                pil.load()
            else:
                arr = np.asarray(image)
                pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
            out["jpg"] = to_mode(pil, mode)  # 16-bit, float and transparent images keep their values
        except Exception as e:  # PIL raises many types for broken files
            raise BadSample("undecodable_image", f"undecodable image ({type(e).__name__})") from None
        out["__decoded_size__"] = (out["jpg"].height, out["jpg"].width)
    caption = raw.get("txt", raw.get("caption"))
    if caption is not None:
        out["txt"] = caption.decode("utf-8", "replace").strip() if isinstance(caption, (bytes, bytearray)) else str(caption)
    label = raw.get("cls", raw.get("label"))
    if label is None:
        label = next((out["json"][k] for k in CLASS_JSON_KEYS if k in out["json"]), None)
    if label is not None:
        try:
            out["cls"] = int(label.decode().strip() if isinstance(label, (bytes, bytearray)) else label)
        except ValueError:
            raise BadSample("bad_class", f"class {label!r} is not an integer") from None
    for key in required:
        if key not in out or (key == "txt" and not out["txt"]):
            raise BadSample(f"missing_{key}", f"no {key} (required_keys)")
    return out


# ------------------------------------------------------------------------- geometry (pure)


def shorter_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) of torchvision's Resize(size) for an int size: the shorter side becomes
    `size`, the longer int(size * long / short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop_origin(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """torchvision's CenterCrop (top, left): int(round((h - th) / 2)) (Python's round)."""
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def nearest_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (H, W) bucket whose aspect ratio is nearest (in log ratio) to h x w's."""
    ratio = math.log(w / h)
    return int(np.argmin([abs(ratio - math.log(bw / bh)) for bh, bw in buckets]))


def cover_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """Smallest (h', w') with the aspect of h x w that covers th x tw."""
    scale = max(th / h, tw / w)
    return max(th, int(round(h * scale))), max(tw, int(round(w * scale)))


def _size(image: Any) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image.Image) else tuple(np.shape(image)[:2])


def _crop(image: Any, top: int, left: int, h: int, w: int) -> Any:
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + w, top + h))
    return image[top : top + h, left : left + w]


def _as_pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[-1]))


# ---------------------------------------------------------------------------- the steps


def resize(size: Any, interpolation: int = 3, buckets: Sequence[tuple[int, int]] | None = None) -> Step:
    if int(interpolation) != 3:
        raise ValueError(f"Resize interpolation {interpolation}: only 3 (bicubic, as the seed) is supported")

    def step(s: dict, rng: np.random.Generator) -> dict:
        h, w = _size(s["jpg"])
        if buckets:
            s["__bucket__"] = nearest_bucket(h, w, buckets)
            new_h, new_w = cover_size(h, w, *buckets[s["__bucket__"]])
        elif np.isscalar(size):
            new_h, new_w = shorter_side_size(h, w, int(size))
        else:
            new_h, new_w = _as_pair(size)
        if (new_h, new_w) != (h, w):
            s["jpg"] = s["jpg"].resize((new_w, new_h), Image.BICUBIC)
        return s

    return step


def crop(size: Any, random: bool) -> Step:
    th, tw = _as_pair(size)

    def step(s: dict, rng: np.random.Generator) -> dict:
        h, w = _size(s["jpg"])
        if h < th or w < tw:
            raise BadSample("too_small", f"{h}x{w} image smaller than the {th}x{tw} crop")
        top, left = (int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))) if random \
            else center_crop_origin(h, w, th, tw)
        s["jpg"] = _crop(s["jpg"], top, left, th, tw)
        return s

    return step


def horizontal_flip(p: float = 0.5) -> Step:
    def step(s: dict, rng: np.random.Generator) -> dict:
        if rng.random() < p:
            img = s["jpg"]
            s["jpg"] = img.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(img, Image.Image) else img[:, ::-1]
        return s

    return step


# ToTensor and Rescaler are elementwise: they are recorded in "__pixel_ops__" and applied,
# in order and in float32 exactly as the seed computes them, once the image is cropped
# (crops and flips commute with them; converting the cropped image only is the cheaper order).


def to_tensor(s: dict, rng: np.random.Generator) -> dict:
    arr = np.asarray(s["jpg"], np.uint8)
    s["jpg"] = arr[..., None] if arr.ndim == 2 else arr
    s["__pixel_ops__"] = [("div", 255.0)]
    return s


def rescaler(isfloat: bool = True, key: Any = "jpg") -> Step:
    ops = [("mul", 2.0), ("sub", 1.0)] if isfloat else [("div", 127.5), ("sub", 1.0)]

    def step(s: dict, rng: np.random.Generator) -> dict:
        if "__pixel_ops__" not in s:  # Rescaler without ToTensor: the seed rescales the raw values
            s["jpg"], s["__pixel_ops__"] = np.asarray(s["jpg"]), []
        s["__pixel_ops__"] += ops
        return s

    return step


def pixel_values(image: np.ndarray, ops: Sequence[tuple[str, float]]) -> np.ndarray:
    """float32 image(s) after the recorded elementwise ops (x / 255, x * 2, x - 1, ...), each
    computed in float32 as the seed's tensors are (in place: one conversion, no temporaries)."""
    x = np.array(image, np.float32)
    for op, value in ops:
        ufunc = {"div": np.divide, "mul": np.multiply, "sub": np.subtract}[op]
        ufunc(x, np.float32(value), out=x)
    return x


def original_size_and_crop(h_key: str = "original_height", w_key: str = "original_width", use_data_key: bool = True,
                           data_key: str = "json", crop: str = "random",
                           buckets: Sequence[tuple[int, int]] | None = None, image_key: str = "jpg") -> Step:
    """The seed's AddOriginalImageSizeAsTupleAndCropToSquare (see the module docstring)."""
    if crop not in ("random", "center"):
        raise ValueError(f"AddOriginalImageSizeAsTupleAndCropToSquare crop must be 'random' or 'center', got {crop!r}")

    def step(s: dict, rng: np.random.Generator) -> dict:
        meta = s.get(data_key, {}) if use_data_key else s
        if h_key in meta and w_key in meta:
            original = (int(meta[h_key]), int(meta[w_key]))
        else:
            original = tuple(s["__decoded_size__"])
        s["original_size_as_tuple"] = np.asarray(original, np.int32)
        h, w = _size(s["jpg"])
        if buckets:
            th, tw = buckets[s["__bucket__"]]
        else:
            th = tw = min(h, w)
        if crop == "random":  # the seed: np.random.randint(0, delta + 1) for top, then left
            top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        else:
            top, left = center_crop_origin(h, w, th, tw)
        s["jpg"] = _crop(s["jpg"], top, left, th, tw)
        s["crop_coords_top_left"] = np.asarray((top, left), np.int32)
        return s

    return step


# ----------------------------------------------------------------- from the seed's config

_TORCHVISION = {
    "Resize": lambda buckets, size, interpolation=2, **_: resize(size, interpolation, buckets),
    "CenterCrop": lambda buckets, size: crop(size, random=False),
    "RandomCrop": lambda buckets, size: crop(size, random=True),
    "RandomHorizontalFlip": lambda buckets, p=0.5: horizontal_flip(p),
    "ToTensor": lambda buckets: to_tensor,
}


def _name(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def build_steps(postprocessors: Sequence[dict], buckets: Sequence[tuple[int, int]] | None = None) -> list[Step]:
    """The seed's `postprocessors` list (sdata mappers holding torchvision transforms) as steps."""
    steps: list[Step] = []
    for entry in postprocessors:
        name, params = _name(entry["target"]), dict(entry.get("params") or {})
        if name == "TorchVisionImageTransforms":
            for t in _transform_list(entry):
                tname, tparams = _name(t["target"]), dict(t.get("params") or {})
                if tname not in _TORCHVISION:
                    raise ValueError(f"unsupported transform {t['target']!r}; supported: {', '.join(_TORCHVISION)}")
                steps.append(_TORCHVISION[tname](buckets, **tparams))
        elif name == "Rescaler":
            steps.append(rescaler(params.get("isfloat", True)))
        elif name == "AddOriginalImageSizeAsTupleAndCropToSquare":
            params.pop("image_key", None)
            steps.append(original_size_and_crop(buckets=buckets, **params))
        else:
            raise ValueError(f"unsupported postprocessor {entry['target']!r}; supported: TorchVisionImageTransforms, "
                             "Rescaler, AddOriginalImageSizeAsTupleAndCropToSquare")
    names = [_name(t["target"]) for e in postprocessors for t in ([e] + list(_transform_list(e)))]
    if buckets and not {"Resize", "AddOriginalImageSizeAsTupleAndCropToSquare"} <= set(names):
        raise ValueError("aspect_buckets need a Resize transform and AddOriginalImageSizeAsTupleAndCropToSquare "
                         "in the postprocessors (they resize to cover the bucket, then crop to it)")
    return steps


def _transform_list(entry: dict) -> list:
    transforms = (entry.get("params") or {}).get("transforms", [])
    return [transforms] if isinstance(transforms, dict) else list(transforms)


def apply_steps(sample: dict, steps: Sequence[Step], rng: np.random.Generator, to_float: bool = True) -> dict:
    """Run the steps, then add target_size_as_tuple and make "jpg" a float32 HWC array (with
    to_float False it stays the cropped uint8 array plus "__pixel_ops__", for the batcher to
    convert a whole batch at once)."""
    for step in steps:
        sample = step(sample, rng)
    if isinstance(sample["jpg"], Image.Image):  # no ToTensor in the config: still [0, 1] floats
        sample = to_tensor(sample, rng)
    sample.setdefault("__pixel_ops__", [])
    if to_float:
        sample["jpg"] = pixel_values(sample["jpg"], sample.pop("__pixel_ops__"))
    sample.setdefault("target_size_as_tuple", np.asarray(sample["jpg"].shape[:2], np.int32))
    return sample


def sample_rng(seed: int, identity: Sequence[int]) -> np.random.Generator:
    """The random stream of one sample: a function of (seed, the sample's identity) only, so a
    resumed or re-sharded run draws the same crops and flips for the same sample and epoch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF] + [int(i) for i in identity]))
