"""Applying LoRA files to a params tree: W' = W + sum_i scale_i * alpha_i / r_i * up_i @ down_i.

    params = apply_loras(params, [("style.safetensors", 0.8), ("detail.safetensors", 0.5)])

    loras = LoraSet(params, [("style.safetensors", 0.8), ("detail.safetensors", 0.5)])
    params = loras.merged()              # the scales given above
    params = loras.merged([0.3, 1.0])    # new scales: re-merged from the retained base weights

Merged once per (file set, scales), sampling costs nothing extra: the sampler receives the
merged tree as its argument, so new scales need no recompilation either. "Unmerged" use
(switching scales) is a `LoraSet`: it keeps the untouched base tree and the parsed factors,
and `merged(scales)` recomputes only the adapted kernels (one r-rank product each, done on
the host in float32; SDXL's ~700 attention projections take about a second). This was chosen
over applying the factors inside every forward pass, which would add two matmuls per adapted
layer to every sampling step and a LoRA branch to the UNet and text modules.

Every LoRA module is checked before anything is computed: keys in no known layout, modules
naming no parameter of this model, down / up shapes that do not fit, or a missing half are
reported together in one line (UserError); with `strict=False` they are skipped with one
warning giving the count. The merge is done in float32 and cast back to each kernel's dtype;
untouched leaves are shared with the base tree, not copied.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np

from sgm_jax.convert.common import FlaxPath, replace_leaves
from sgm_jax.errors import UserError
from sgm_jax.lora.files import LoraFile, read_lora
from sgm_jax.lora.names import Target, lora_targets

LoraSource = Union[str, os.PathLike, LoraFile]
SHOWN = 8  # names listed per kind of problem; counts are always complete


class LoraWarning(UserWarning):
    """Parts of a LoRA file skipped in non-strict mode."""


@dataclass(frozen=True)
class Factor:
    """One resolved LoRA module: delta (PyTorch layout) = factor * up.reshape(out, r) @ down.reshape(r, -1)."""

    target: Target
    down: np.ndarray
    up: np.ndarray
    factor: float


def _get(tree: Mapping[str, Any], path: FlaxPath) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:SHOWN]) + more


def resolve(lora: LoraFile, params: Mapping[str, Any], targets: Mapping[str, Target] | None = None,
            *, strict: bool = True) -> list[Factor]:
    """Match every module of `lora` to a kernel of `params`; problems as described above."""
    targets = lora_targets(params) if targets is None else targets
    factors, unmatched, misshaped, incomplete = [], [], [], []
    for name, module in lora.modules.items():
        if module.down is None or module.up is None:
            incomplete.append(name)
            continue
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
            continue
        want = target.torch_shape(tuple(_get(params, target.path).shape))
        rank = module.rank
        down_in = int(np.prod(module.down.shape[1:]))
        ok = (module.up.shape[0] == want[0] and int(np.prod(module.up.shape[1:])) == rank
              and down_in == int(np.prod(want[1:])) and module.down.shape[1] == want[1])
        if not ok:
            misshaped.append(f"{name} up {list(module.up.shape)} down {list(module.down.shape)} "
                             f"(weight {list(want)})")
            continue
        factors.append(Factor(target, module.down, module.up, module.factor))
    problems = [_listing(t, items) for t, items in (("unknown keys", lora.unknown), ("modules matching no parameter",
                unmatched), ("mis-shaped modules", misshaped), ("modules without both down and up", incomplete)) if items]
    if problems:
        count = len(lora.unknown) + len(unmatched) + len(misshaped) + len(incomplete)
        if strict:
            raise UserError(f"LoRA file {lora.path} ({lora.layout} layout) does not fit this model: "
                            + "; ".join(problems) + " (non-strict mode skips them)")
        warnings.warn(f"LoRA file {lora.path}: skipped {count} of {len(lora.modules) + len(lora.unknown)} entries "
                      f"that do not fit this model ({len(factors)} modules applied)", LoraWarning, stacklevel=3)
    return factors


def torch_delta(factor: Factor) -> np.ndarray:
    """alpha / r * up @ down, float32, as a 2-d [out, in * kh * kw] PyTorch-layout matrix."""
    up = factor.up.astype(np.float32).reshape(factor.up.shape[0], -1)
    down = factor.down.astype(np.float32).reshape(factor.down.shape[0], -1)
    return (up @ down) * np.float32(factor.factor)


def flax_delta(factor: Factor, flax_shape: tuple[int, ...]) -> np.ndarray:
    """The delta in the kernel's Flax layout (the fused block's columns only for in_proj)."""
    delta = torch_delta(factor)
    if factor.target.kind == "conv":
        kh, kw, cin, cout = flax_shape
        return delta.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
    return delta.T


def merge_factors(params: Mapping[str, Any], weighted: Sequence[tuple[Sequence[Factor], float]]) -> dict[str, Any]:
    """params with every factor added (scaled), one float32 accumulation per kernel.

    Returns a new tree sharing every untouched leaf with `params`."""
    deltas: dict[FlaxPath, np.ndarray] = {}
    for factors, scale in weighted:
        if scale == 0:
            continue
        for factor in factors:
            path = factor.target.path
            shape = tuple(_get(params, path).shape)
            acc = deltas.get(path)
            if acc is None:
                acc = deltas[path] = np.zeros(shape, np.float32)
            cols = factor.target.columns
            view = acc[..., cols[0]:cols[1]] if cols else acc
            view += np.float32(scale) * flax_delta(factor, shape)
    merged = {}
    for path, delta in deltas.items():
        base = _get(params, path)
        merged[path] = (np.asarray(base, np.float32) + delta).astype(base.dtype)
    return replace_leaves(params, merged)


class LoraSet:
    """Several LoRA files with their scales over one base params tree, merged on demand.

    loras: [(path or LoraFile, scale), ...]. The files are read and checked against `params`
    once (see `resolve`); `merged(scales)` returns base + the scaled deltas and caches the
    result of the last scales asked for. The base tree is kept, never modified.
    """

    def __init__(self, params: Mapping[str, Any], loras: Sequence[tuple[LoraSource, float]], *, strict: bool = True):
        self.base = params
        targets = lora_targets(params)
        self.files: list[LoraFile] = []
        self.factors: list[list[Factor]] = []
        for source, _ in loras:
            lora = source if isinstance(source, LoraFile) else read_lora(source)
            self.files.append(lora)
            self.factors.append(resolve(lora, params, targets, strict=strict))
        self.scales = tuple(float(s) for _, s in loras)
        self._cache: tuple[tuple[float, ...], dict[str, Any]] | None = None

    def merged(self, scales: Sequence[float] | None = None) -> dict[str, Any]:
        """The base params with every LoRA merged at `scales` (default: the ones given)."""
        scales = self.scales if scales is None else tuple(float(s) for s in scales)
        if len(scales) != len(self.files):
            raise ValueError(f"{len(scales)} scales given for {len(self.files)} LoRA files")
        if self._cache is None or self._cache[0] != scales:
            self._cache = (scales, merge_factors(self.base, list(zip(self.factors, scales))))
        return self._cache[1]

    def describe(self) -> str:
        return ", ".join(f"{os.path.basename(f.path)} x{s:g} ({len(fs)} modules, {f.layout})"
                         for f, fs, s in zip(self.files, self.factors, self.scales))


def apply_loras(params: Mapping[str, Any], loras: Sequence[tuple[LoraSource, float]], *,
                strict: bool = True) -> dict[str, Any]:
    """params (engine `{"model", "conditioner", ...}` or a bare UNet tree; numpy or jax
    leaves) with the LoRA files merged in: W + scale * alpha / r * up @ down per module.

    loras: [(path or LoraFile, scale), ...], kohya-ss or diffusers / peft layout each.
    strict: any key that fits no parameter is a UserError listing them; False: skipped, one
    LoraWarning with the count. Returns numpy leaves for the adapted kernels, the other
    leaves shared with `params`."""
    if not loras:
        return dict(params)
    return LoraSet(params, loras, strict=strict).merged()
