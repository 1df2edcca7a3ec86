"""Reading LoRA `.safetensors` files (kohya-ss and diffusers / peft layouts) into modules.

kohya-ss (sd-scripts, most community files):
    lora_unet_<module>.lora_down.weight  [r, in] or [r, in, kh, kw] (LoCon convs)
    lora_unet_<module>.lora_up.weight    [out, r] or [out, r, 1, 1]
    lora_unet_<module>.alpha             scalar (absent: alpha = r)
    lora_te_ / lora_te1_ / lora_te2_<module>...   text towers (transformers' names)
  <module> is the seed's module path with `.` as `_` for SDXL, diffusers' for SD 1/2.
diffusers / peft (diffusers' training scripts, `save_lora_weights`):
    unet.<diffusers module>.lora_A.weight / .lora_B.weight   (down / up)
    text_encoder.<module>..., text_encoder_2.<module>...
  and diffusers' older spellings `.lora.down.weight` / `.lora.up.weight`,
  `.lora_linear_layer.down.weight`, `.processor.to_q_lora.down.weight`. alpha: a `.alpha`
  entry, else the `lora_adapter_metadata` JSON diffusers writes (`unet.lora_alpha`,
  `unet.alpha_pattern`, the same for `text_encoder` / `text_encoder_2`), else r (factor 1).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sgm_jax.errors import UserError

_KOHYA_COMPONENTS = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
_DIFFUSERS_COMPONENTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
                         ("base_model.model.", "unet"))
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
          (".lora_B.weight", "up"), (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"), (".alpha", "alpha"))
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")  # diffusers' LoRAAttnProcessor


@dataclass
class LoraModule:
    """One adapted module: down [r, ...], up [out, r, ...] (PyTorch layouts), alpha."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / rank: the scale kohya and peft put on up @ down."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclass
class LoraFile:
    """A parsed LoRA file. modules: {"unet:<name>" / "te1:<name>" / "te2:<name>": LoraModule};
    unknown: keys in no known layout; layout: "kohya", "diffusers" or "mixed"."""

    path: str
    modules: dict[str, LoraModule]
    unknown: list[str]
    layout: str
    metadata: dict[str, str]


def split_key(key: str) -> tuple[str, str, str] | None:
    """A LoRA file key -> (component, underscored module name, role) or None if unknown."""
    role = next((r for suffix, r in _ROLES if key.endswith(suffix)), None)
    if role is None:
        return None
    stem = key[: -len(next(s for s, r in _ROLES if key.endswith(s)))]
    for prefix, component in _KOHYA_COMPONENTS:
        if stem.startswith(prefix):
            return component, stem[len(prefix):], role
    for prefix, component in _DIFFUSERS_COMPONENTS:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            stem = stem[len("base_model.model."):] if stem.startswith("base_model.model.") else stem
            m = _PROCESSOR.search(stem)
            if m:
                proj = "to_out.0" if m.group(1) == "to_out" else m.group(1)
                stem = stem[: m.start()] + "." + proj
            return component, stem.replace(".", "_"), role
    return None


def parse_lora(tensors: dict[str, np.ndarray], path: str = "<memory>",
               metadata: dict[str, str] | None = None) -> LoraFile:
    """Group a LoRA state dict `{key: array}` into modules."""
    modules: dict[str, LoraModule] = {}
    unknown, layouts = [], set()
    for key in sorted(tensors):
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        component, name, role = parts
        layouts.add("kohya" if key.startswith("lora_") else "diffusers")
        module = modules.setdefault(f"{component}:{name}", LoraModule())
        module.keys.append(key)
        value = np.asarray(tensors[key])
        if role == "alpha":
            if value.size != 1:
                unknown.append(key)  # an alpha must be one number
                continue
            module.alpha = float(value.reshape(-1)[0])
        else:
            setattr(module, role, value)
    _alpha_from_metadata(modules, metadata or {})
    layout = layouts.pop() if len(layouts) == 1 else ("mixed" if layouts else "none")
    return LoraFile(str(path), modules, unknown, layout, dict(metadata or {}))


def _alpha_from_metadata(modules: dict[str, LoraModule], metadata: dict[str, str]) -> None:
    """alpha of modules without a `.alpha` entry from diffusers' `lora_adapter_metadata`
    (peft's LoraConfig per component: `lora_alpha`, and `alpha_pattern` {module suffix: alpha})."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    for name, module in modules.items():
        if module.alpha is not None:
            continue
        component, module_name = name.split(":", 1)
        prefix = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[component]
        patterns = config.get(f"{prefix}.alpha_pattern") or {}
        match = [a for p, a in patterns.items() if module_name.endswith(p.replace(".", "_"))]
        alpha = match[0] if match else config.get(f"{prefix}.lora_alpha")
        if alpha is not None:
            module.alpha = float(alpha)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA `.safetensors` file; UserError (one line) when absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"LoRA file {path} not found")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA file {path}: only .safetensors LoRA files are read")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"LoRA file {path}: not a readable safetensors file: {' '.join(str(e).split())}") from None
    bad = next((k for k in sorted(tensors) if np.issubdtype(tensors[k].dtype, np.floating)
                and not np.isfinite(tensors[k]).all()), None)
    if bad is not None:  # merged, it would turn every image black
        raise UserError(f"LoRA file {path}: {bad} holds NaN or Inf values (a damaged file or a diverged "
                        "training): re-export or re-download it")
    lora = parse_lora(tensors, str(path), metadata)
    if not lora.modules:
        raise UserError(f"LoRA file {path}: no LoRA weights in it (neither kohya `lora_unet_*.lora_down.weight` "
                        f"nor diffusers `unet.*.lora_A.weight` keys; {len(lora.unknown)} other keys)")
    return lora


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (path, scale); scale 1.0 when absent. A file whose
    name holds a colon is taken whole; any other text after the last colon must be a finite number."""
    path, sep, tail = spec.rpartition(":")
    if not sep or tail.endswith(".safetensors") or Path(spec).expanduser().is_file():
        return spec, 1.0
    try:
        scale = float(tail)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise UserError(f"--lora {spec}: the scale {tail!r} is not a number (FILE[:SCALE], e.g. {path}:0.8)")
    return path, scale
