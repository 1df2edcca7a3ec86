"""Host-side set-up for sampling: config files, converted weights, tokenizer, input images, and
JAX's persistent compilation cache. Errors are one line saying what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgm_jax.convert.checkpoint import CheckpointFileError, load_params
from sgm_jax.errors import UserError
from sgm_jax.lora import LoraFile, apply_loras, read_lora

DEFAULT_CACHE_DIR = Path("~/.cache/sgm_jax/jax_cache")


class SetupError(UserError):
    """A missing or unusable input (weights, tokenizer, image, size): the message is the whole story."""


def convert_command(config_path: str | os.PathLike, output: str | os.PathLike) -> str:
    return (f"python convert_torch_weights.py --config {config_path} --checkpoint <your .safetensors> "
            f"--output {output}")


def check_checkpoint(checkpoint: str | os.PathLike | None, config_path: str | os.PathLike) -> Path:
    """The converted-weights directory, or SetupError naming the convert command (reads nothing)."""
    if checkpoint is None:
        raise SetupError(f"no --checkpoint given for {config_path}: convert the weights first with "
                         f"`{convert_command(config_path, 'checkpoints/<name>')}` and pass --checkpoint DIR")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise SetupError(f"converted weights not found: {path} does not exist; create it with "
                         f"`{convert_command(config_path, path)}`")
    return path


def load_checkpoint(checkpoint: str | os.PathLike | None, config_path: str | os.PathLike,
                    dtype: str | None = None, *, loras: Sequence[tuple[str | os.PathLike, float]] = (),
                    lora_strict: bool = True) -> dict[str, Any]:
    """Converted params (sgm_jax.convert.load_params) or SetupError naming the convert command.

    loras: [(LoRA .safetensors path, scale), ...] merged into the weights once
    (`sgm_jax.lora.apply_loras`); the LoRA files are checked (readable, every key fits this
    model, or with lora_strict=False skipped with a warning) before the weights are read.
    """

    path = check_checkpoint(checkpoint, config_path)
    lora_files = read_loras(loras)
    try:
        params = load_params(path, dtype=dtype)
    except (CheckpointFileError, FileNotFoundError) as err:
        raise SetupError(f"{err}; (re)create it with `{convert_command(config_path, path)} --overwrite`") from None
    return merge_loras(params, lora_files, strict=lora_strict)


def read_loras(loras: Sequence[tuple[Any, float]]) -> list[tuple[Any, float]]:
    """[(path, scale)] -> [(parsed LoraFile, scale)]; SetupError (one line) for a bad file."""
    try:
        return [(src if isinstance(src, LoraFile) else read_lora(src), float(scale)) for src, scale in loras]
    except UserError as err:
        raise SetupError(str(err)) from None


def merge_loras(params: dict[str, Any], loras: Sequence[tuple[Any, float]], *, strict: bool = True) -> dict[str, Any]:
    """params with the LoRA files merged (sgm_jax.lora.apply_loras); SetupError when one does not fit."""
    if not loras:
        return params
    try:
        return apply_loras(params, loras, strict=strict)
    except UserError as err:
        raise SetupError(str(err)) from None


def load_clip_tokenizer(config: Any, source: str | os.PathLike | None) -> Any:
    """The CLIP BPE tokenizer for every text embedder of `config` (None when it has none).

    source: --tokenizer (a tokenizer folder, a diffusers checkpoint folder, or the BPE file);
    None: config.inference.tokenizer_path, then sgm_jax.nn.tokenizer's default places.
    """
    # transformers is heavy and, without torch, prints a line on import: only text models need it
    from sgm_jax.nn.tokenizer import load_tokenizer

    inference = config.get("inference") or {}
    specs = config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    if not any(str(s.get("input_key", "")) == "txt" for s in specs):
        return None
    source = source if source is not None else inference.get("tokenizer_path")
    subfolders = list(inference.get("tokenizers") or [None])
    try:
        return load_tokenizer(source, subfolder=subfolders[0] if source is not None else None)
    except FileNotFoundError as err:
        raise SetupError(str(err)) from None


def load_image(path: str | os.PathLike, width: int | None = None, height: int | None = None,
               multiple: int = 64) -> np.ndarray:
    """RGB image -> float32 [1, H, W, 3] in [-1, 1] (as the seed's load_img).

    Resized to width x height when given, else down to the nearest multiple of `multiple`
    (the seed floors to multiples of 64).
    """
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"init image {path} not found")
    image = Image.open(path).convert("RGB")
    w, h = image.size
    size = (int(width or w - w % multiple), int(height or h - h % multiple))
    if min(size) <= 0:
        raise SetupError(f"init image {path} is {w}x{h} px: smaller than one {multiple}-px block")
    if size != (w, h):
        print(f"init image {w}x{h} resized to {size[0]}x{size[1]}")
        image = image.resize(size, Image.BICUBIC)
    return (np.asarray(image, np.float32)[None] / 127.5 - 1.0).astype(np.float32)


def enable_compilation_cache(cache_dir: str | os.PathLike | None) -> Path | None:
    """Turn on JAX's persistent compilation cache in `cache_dir` (None: leave it off).

    The size / compile-time thresholds are lowered to zero so that every compiled function
    is cached, the small ones of a tiny model included.
    """
    import jax

    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
