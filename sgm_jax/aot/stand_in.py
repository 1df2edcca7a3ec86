"""Shapes without data: stand-ins for a config's data set and for the CLIP tokenizer.

A compile needs the shapes of one batch, never its contents. A streaming (tar shard) data
section becomes `data.target: synthetic` with the image shape its transforms produce (the
largest aspect bucket, else the Resize / crop size) and the input keys its conditioner reads;
in-memory sets (MNIST, CIFAR) are small and are used as they are.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sgm_jax.data import STREAMING_TARGETS
from sgm_jax.data.streaming import _MODES
from sgm_jax.diffusion.registry import to_plain
from sgm_jax.errors import UserError
from sgm_jax.nn.lpips import LPIPS

SOT, EOT = 49406, 49407  # CLIP's start / end of text ids


class ShapeTokenizer:
    """Stands in for the CLIP tokenizer where only shapes matter: every text -> [sot, eot], padded
    later to the embedder's max_length by sgm_jax.nn.tokenizer.tokenize. Needs no vocabulary file."""

    eos_token_id = EOT

    def __call__(self, texts: Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[SOT, EOT] for _ in texts]}


def lpips_stand_in() -> Any:
    """Random LPIPS weights (VGG16 trunk + linear heads) of the converted files' shapes: the
    autoencoder's step closes over them as constants, so a compile needs real arrays, never their values."""
    import jax
    import jax.numpy as jnp


    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return jax.jit(LPIPS().init)(jax.random.key(0), x, x)["params"]


def conditioner_keys(model_config: Mapping[str, Any]) -> list[str]:
    """Input keys of a DiffusionEngine config's embedders, in order ([] without a conditioner)."""
    params = model_config.get("params", model_config)
    specs = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    keys: list[str] = []
    for spec in specs:
        for key in [spec.get("input_key")] + list(spec.get("input_keys") or []):
            if key and key not in keys:
                keys.append(str(key))
    return keys


def _transform_sizes(postprocessors: Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(Resize size, crop size) named by the seed's postprocessors (torchvision-style entries)."""
    resize = crop = None
    stack = list(postprocessors)
    while stack:
        entry = stack.pop(0)
        target, params = str(entry.get("target", "")), dict(entry.get("params") or {})
        stack[:0] = list(params.get("transforms") or [])
        size = params.get("size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        if target.endswith("Resize") and size:
            resize = int(size)
        elif target.endswith("Crop") and size:
            crop = int(size)
    return resize, crop


def stream_image_shape(datapipeline: Mapping[str, Any]) -> tuple[int, int, int]:
    """[H, W, C] of the images a streaming datapipeline yields (its largest aspect bucket)."""
    pc = dict(datapipeline.get("pipeline_config") or {})

    decoders = [str(d).lower() for d in datapipeline.get("decoders") or ["pil"]]
    channels = 1 if _MODES.get(decoders[0]) == "L" else 3
    buckets = [tuple(int(v) for v in b) for b in pc.get("aspect_buckets") or ()]
    if buckets:
        h, w = max(buckets, key=lambda b: b[0] * b[1])
        return (h, w, channels)
    resize, crop = _transform_sizes(datapipeline.get("postprocessors") or ())
    side = crop or resize
    if not side:
        raise UserError("cannot tell the image size from data.params.train.datapipeline (no aspect_buckets, Resize "
                        "or crop size): pass --width and --height")
    return (side, side, channels)


def stand_in_data(config: Any, image_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """A `data` section that builds without files: synthetic batches of the config's shapes.

    image_hw: (height, width) instead of the config's image size."""

    data = to_plain(config.data)
    target, params = str(data.get("target")), dict(data.get("params") or {})
    if target == "synthetic":
        shape = list(params.get("image_shape"))
    elif target in STREAMING_TARGETS:
        section = params.get("train") or params
        pipe, loader = dict(section["datapipeline"]), dict(section.get("loader") or {})
        if pipe.get("preencoded"):
            raise UserError("pre-encoded data: compile the config with its raw-image data section "
                            "(datapipeline.preencoded=False); the pre-encoded step skips the frozen towers")
        shape = list(stream_image_shape(pipe))
        params = {"batch_size": int(loader.get("batch_size", 64))}
    else:  # in-memory sets (MNIST, CIFAR-10): small, used as they are unless a size is asked for
        if image_hw is None:
            return data
        raise UserError(f"--width / --height apply to streaming or synthetic data, not data.target {target!r}")
    if image_hw is not None:
        shape[:2] = [int(image_hw[0]), int(image_hw[1])]
    keys = [k for k in conditioner_keys(to_plain(config.model)) if k != "jpg"]
    return {"target": "synthetic", "params": {**params, "image_shape": shape, "keys": keys}}
