"""Training LoRA adapters on the UNet: init, differentiable merge, kohya export, reload.

    adapters = init_adapters(params, rank=8, alpha=8.0, key=jax.random.key(0))
    loss = lambda a: loss_fn(merge_adapters(params, a))      # grads flow to the adapters only
    opt_state = optax.adam(1e-4).init(adapters)              # the base weights stay frozen
    export_kohya(adapters, "my_lora.safetensors")            # readable by apply_loras, kohya, ComfyUI...

`adapters` mirrors the params tree down to each adapted module, whose value is a `LoraPair`
(a pytree of two arrays; `alpha` is static, so optimisers and checkpoints only see `down`
and `up`), in Flax layouts:
  Dense kernel [in, out]:          down [in, r],          up [r, out]
  Conv kernel  [kh, kw, in, out]:  down [kh, kw, in, r],  up [r, out]   (a kh x kw conv, then 1x1)
  merged kernel = kernel + scale * alpha / r * (down @ up)   (einsum over r for convs)
`up` starts at zero (kohya / peft do the same), so the adapted model starts as the base model.
The params tree may be the engine's (`{"model": ...}`, adapters under "model") or a bare UNet's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.convert.common import FlaxPath, flatten_params, replace_leaves, unflatten_params
from sgm_jax.convert.files import save_safetensors
from sgm_jax.convert.unet import flax_path_to_torch
from sgm_jax.errors import UserError
from sgm_jax.lora.files import read_lora
from sgm_jax.lora.names import unet_subtree, unet_targets, underscored

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
PROJECTION_TARGETS = ("proj_in", "proj_out")
# ResBlock convs and 1x1 skips, the down / upsampling convs (kohya's LoCon "conv" modules).
CONV_TARGETS = ("in_layers_2", "out_layers_3", "skip_connection", "op", "conv")
KOHYA_UNET_PREFIX = "lora_unet_"


@flax.struct.dataclass
class LoraPair:
    """One adapted kernel's factors (Flax layouts, see the module docstring)."""

    down: jax.Array
    up: jax.Array
    alpha: float = flax.struct.field(pytree_node=False)

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])

    def delta(self) -> jax.Array:
        """alpha / r * down @ up in the kernel's Flax layout."""
        d = jnp.einsum("...r,ro->...o", self.down, self.up) if self.down.ndim == 4 else self.down @ self.up
        return d * (self.alpha / self.rank)


def _kernel_modules(params: Mapping[str, Any], target_modules: Sequence[str]) -> list[tuple[FlaxPath, Any]]:
    """(module path, kernel) of every UNet kernel whose module name fullmatches a pattern."""
    base, unet = unet_subtree(params)
    if unet is None:
        raise ValueError("init_adapters: no UNet in the params tree (expected input_blocks_0 at the top or under 'model')")
    patterns = [re.compile(p) for p in target_modules]
    return [(base + path[:-1], value) for path, value in flatten_params(unet).items()
            if path[-1] == "kernel" and any(p.fullmatch(path[-2]) for p in patterns)]


def adapter_items(adapters: Mapping[str, Any], prefix: FlaxPath = ()) -> list[tuple[FlaxPath, LoraPair]]:
    """[(module path, LoraPair)] of an adapters tree."""
    items = []
    for name, value in adapters.items():
        if isinstance(value, LoraPair):
            items.append((prefix + (name,), value))
        else:
            items.extend(adapter_items(value, prefix + (name,)))
    return items


def init_adapters(params: Mapping[str, Any], rank: int = 4, alpha: float | None = None,
                  target_modules: Sequence[str] = ATTENTION_TARGETS, key: jax.Array | None = None) -> dict[str, Any]:
    """Fresh adapters for the UNet kernels of `params` whose module name fullmatches one of
    `target_modules` (regexes; default the attention projections to_q / to_k / to_v / to_out.0;
    add PROJECTION_TARGETS and / or CONV_TARGETS for more). alpha None = rank (factor 1).
    down ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's Linear init, as kohya), up = 0."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    modules = _kernel_modules(params, target_modules)
    if not modules:
        raise ValueError(f"no UNet module matches the LoRA target_modules {list(target_modules)}")
    key = jax.random.key(0) if key is None else key
    pairs = []
    for (path, kernel), k in zip(modules, jax.random.split(key, len(modules))):
        shape = tuple(kernel.shape)
        bound = 1.0 / float(np.sqrt(np.prod(shape[:-1])))
        down = jax.random.uniform(k, shape[:-1] + (rank,), jnp.float32, -bound, bound)
        up = jnp.zeros((rank, shape[-1]), jnp.float32)
        pairs.append((path, LoraPair(down, up, float(rank if alpha is None else alpha))))
    return unflatten_params(dict(pairs))


def merge_adapters(base_params: Mapping[str, Any], adapters: Mapping[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """base_params with kernel + scale * alpha / r * down @ up for every adapter. Pure and
    differentiable (use under jit / grad); leaves without an adapter are passed through."""
    merged = {}
    for path, pair in adapter_items(adapters):
        kernel = _kernel_at(base_params, path + ("kernel",))
        merged[path + ("kernel",)] = (kernel + scale * pair.delta()).astype(kernel.dtype)  # summed in float32
    return replace_leaves(base_params, merged)


def _module_name(path: FlaxPath, ndim: int) -> str:
    if path and path[0] == "model":
        path = path[1:]
    key, _ = flax_path_to_torch(path + ("kernel",), ndim)
    return key[: -len(".weight")]


def export_kohya(adapters: Mapping[str, Any], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False, dtype: Any = np.float32) -> Path:
    """Write adapters as a kohya-ss LoRA `.safetensors` (`lora_unet_<seed module>.lora_down.weight`
    [r, in(, kh, kw)], `.lora_up.weight` [out, r(, 1, 1)], `.alpha`), with sd-scripts' metadata
    (`ss_network_module`, `ss_network_dim`, `ss_network_alpha`). Atomic; refuses to replace a
    file unless `overwrite`."""
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, convs = set(), set(), False
    for module_path, pair in adapter_items(adapters):
        down, up = np.asarray(pair.down, np.float32), np.asarray(pair.up, np.float32)
        name = KOHYA_UNET_PREFIX + underscored(_module_name(module_path, down.ndim))
        if down.ndim == 4:
            convs = True
            down_t, up_t = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:
            down_t, up_t = down.T, up.T
        tensors[name + ".lora_down.weight"] = down_t.astype(dtype)
        tensors[name + ".lora_up.weight"] = up_t.astype(dtype)
        tensors[name + ".alpha"] = np.asarray(pair.alpha, dtype)
        ranks.add(pair.rank)
        alphas.add(pair.alpha)
    if not tensors:
        raise ValueError("export_kohya: the adapters tree is empty")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": f"{max(alphas):g}", "converted_by": "sgm_jax"}
    if convs:
        meta["ss_network_args"] = '{"conv_dim": "%d", "conv_alpha": "%g"}' % (max(ranks), max(alphas))
    meta.update(metadata or {})
    return save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_adapters(path: str | os.PathLike, params: Mapping[str, Any]) -> dict[str, Any]:
    """A kohya (or diffusers) UNet LoRA file -> adapters tree for `params` (the inverse of
    `export_kohya`; also reads other tools' files, e.g. to continue training one). Text-tower
    modules and any module naming no UNet kernel are a UserError listing them."""
    lora = read_lora(path)
    targets = unet_targets(params)
    pairs, problems = [], list(lora.unknown)
    for name, module in lora.modules.items():
        target = targets.get(name)
        if target is None or module.down is None or module.up is None or target.columns is not None:
            problems.append(name)
            continue
        rank = module.rank
        kernel_shape = tuple(_kernel_at(params, target.path).shape)
        if target.kind == "conv":
            kh, kw, cin, cout = kernel_shape
            down = module.down.reshape(rank, cin, kh, kw).transpose(2, 3, 1, 0)
        else:
            down = module.down.reshape(rank, -1).T
        up = module.up.reshape(module.up.shape[0], rank).T
        pairs.append((target.path[:-1], LoraPair(jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32),
                                                  float(module.alpha if module.alpha is not None else rank))))
    if problems:
        raise UserError(f"LoRA file {path}: {len(problems)} entries are not UNet adapters of this model: "
                        + ", ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return unflatten_params(dict(pairs))


def _kernel_at(params: Mapping[str, Any], path: FlaxPath) -> Any:
    for name in path:
        params = params[name]
    return params
