"""LoRA: community LoRA files (kohya-ss, diffusers / peft) merged into our params, and LoRA
training helpers with export to the kohya layout.

Sampling (what sample.py / Pipeline / the demo call):
    apply_loras(params, [(path, scale), ...], strict=True) -> params       merged once
    LoraSet(params, [(path, scale), ...]).merged(scales)                   switch scales cheaply
    parse_lora_spec("file.safetensors:0.8") -> ("file.safetensors", 0.8)   the CLI's --lora FILE[:SCALE]
Training:
    init_adapters(params, rank, alpha, target_modules, key) -> adapters
    merge_adapters(base_params, adapters, scale=1.0) -> params            differentiable
    export_kohya(adapters, path) / load_adapters(path, params)
Names (which key means which parameter): sgm_jax.lora.names.
"""

from sgm_jax.lora.adapters import (ATTENTION_TARGETS, CONV_TARGETS, PROJECTION_TARGETS, LoraPair, adapter_items,
                                   export_kohya, init_adapters, load_adapters, merge_adapters)
from sgm_jax.lora.files import LoraFile, LoraModule, parse_lora, parse_lora_spec, read_lora
from sgm_jax.lora.merge import LoraSet, LoraWarning, apply_loras, resolve
from sgm_jax.lora.names import Target, lora_targets, seed_to_diffusers

__all__ = [
    "ATTENTION_TARGETS", "CONV_TARGETS", "PROJECTION_TARGETS", "LoraFile", "LoraModule", "LoraPair", "LoraSet",
    "LoraWarning", "Target", "adapter_items", "apply_loras", "export_kohya", "init_adapters", "load_adapters",
    "lora_targets", "merge_adapters", "parse_lora", "parse_lora_spec", "read_lora", "resolve", "seed_to_diffusers",
]
