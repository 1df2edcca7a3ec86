"""Shared machinery for PyTorch (seed layout) <-> Flax parameter conversion.

Every network's converter describes itself as a *key map*: for each Flax parameter path
(a tuple of names, as in the Flax params tree) the PyTorch key it comes from (without the
checkpoint prefix) and a transform kind. Each Flax parameter corresponds to exactly one
PyTorch tensor, so conversion and export are inverse, bit-exact maps.

Transform kinds:
  "linear": torch Linear weight [out, in] -> Flax Dense kernel [in, out]
  "conv":   torch Conv weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]
            (any rank: Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out])
  "copy":   same layout (biases, norms, embeddings, text_projection used as x @ W)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

FlaxPath = tuple[str, ...]
KeyMap = Mapping[FlaxPath, tuple[str, str]]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model config (missing / unexpected / mis-shaped keys)."""


def to_flax_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(np.transpose(array, (1, 0)))
    if kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (*range(2, array.ndim), 1, 0)))
    if kind == "copy":
        return array
    raise ValueError(f"unknown transform kind {kind!r}")


def to_torch_layout(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(np.transpose(array, (1, 0)))
    if kind == "conv":
        n = array.ndim
        return np.ascontiguousarray(np.transpose(array, (n - 1, n - 2, *range(n - 2))))
    if kind == "copy":
        return array
    raise ValueError(f"unknown transform kind {kind!r}")


def torch_shape(kind: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape the PyTorch tensor must have for a Flax parameter of `flax_shape`."""
    s = tuple(int(d) for d in flax_shape)
    if kind == "linear":
        return (s[1], s[0])
    if kind == "conv":
        return (s[-1], s[-2], *s[:-2])
    return s


def flatten_params(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
    """{"a": {"b": x}} -> {("a", "b"): x}."""
    flat: dict[FlaxPath, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def unflatten_params(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def replace_leaves(tree: Mapping[str, Any], values: Mapping[FlaxPath, Any]) -> dict[str, Any]:
    """A copy of `tree` with the leaves at `values`' paths replaced; only the dicts on those
    paths are copied, every other subtree and leaf is shared (works on tracers under jit)."""
    out = dict(tree)
    for path, value in values.items():
        node, src = out, tree
        for name in path[:-1]:
            src = src[name]
            if node[name] is src:
                node[name] = dict(src)
            node = node[name]
        node[path[-1]] = value
    return out


def _shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    shape_fn: Callable[[str], Sequence[int]] | None = getattr(state_dict, "shape_of", None)
    if shape_fn is not None:
        return tuple(int(d) for d in shape_fn(key))
    return tuple(np.shape(state_dict[key]))


def _format_problems(title: str, problems: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(problems[:limit])
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{title} ({len(problems)}): {shown}{more}"


def validate(
    state_dict: Mapping[str, Any],
    key_map: KeyMap,
    abstract_params: Mapping[str, Any],
    *,
    prefix: str = "",
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys.

    `abstract_params`: the model's params tree (arrays or ShapeDtypeStructs) that the key map
    must cover exactly. Unexpected keys are only those under `prefix` (a full checkpoint
    holds several networks) whose suffix is not in `ignore_unexpected`.
    """
    flax_shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract_params).items()}
    unmapped = sorted(".".join(p) for p in flax_shapes if p not in key_map)
    if unmapped:  # a bug in a key map, not in the user's checkpoint
        raise CheckpointMismatchError(_format_problems("Flax params without a key", unmapped))
    ignored = tuple(ignore_unexpected)
    wanted = {prefix + key_map[p][0]: (p, key_map[p][1]) for p in flax_shapes}
    present = set(state_dict.keys())
    missing = sorted(k for k in wanted if k not in present)
    unexpected = sorted(
        k for k in present
        if k.startswith(prefix) and k not in wanted and not (ignored and k.endswith(ignored))
    )
    misshaped = []
    for key, (path, kind) in wanted.items():
        if key in present:
            want = torch_shape(kind, flax_shapes[path])
            got = _shape_of(state_dict, key)
            if got != want:
                misshaped.append(f"{key} {list(got)} != expected {list(want)}")
    lines = []
    if missing:
        lines.append(_format_problems("missing keys", missing))
    if unexpected:
        lines.append(_format_problems("unexpected keys", unexpected))
    if misshaped:
        lines.append(_format_problems("mis-shaped keys", misshaped))
    if lines:
        raise CheckpointMismatchError(
            f"checkpoint does not match the model config under prefix {prefix!r}: " + "; ".join(lines)
        )


def convert_state_dict(
    state_dict: Mapping[str, Any],
    key_map: KeyMap,
    abstract_params: Mapping[str, Any],
    *,
    prefix: str = "",
    ignore_unexpected: Iterable[str] = (),
    dtype: Any = None,
) -> dict[str, Any]:
    """Seed-layout state dict -> Flax params tree (numpy arrays). Validates first.

    `state_dict` may be lazy (values read on access, optional `shape_of(key)`), so a large
    safetensors file is read tensor by tensor. `dtype=None` keeps the stored dtype.
    """
    validate(state_dict, key_map, abstract_params, prefix=prefix, ignore_unexpected=ignore_unexpected)
    flat = {}
    for path in flatten_params(abstract_params):
        torch_key, kind = key_map[path]
        array = to_flax_layout(kind, np.asarray(state_dict[prefix + torch_key]))
        flat[path] = array.astype(dtype) if dtype is not None else array
    return unflatten_params(flat)


def export_state_dict(params: Mapping[str, Any], key_map: KeyMap, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params tree -> seed-layout state dict (the inverse of convert_state_dict)."""
    out = {}
    for path, value in flatten_params(params).items():
        torch_key, kind = key_map[path]
        out[prefix + torch_key] = to_torch_layout(kind, np.asarray(value))
    return out
