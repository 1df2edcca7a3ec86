"""Build framework objects from seed-style configs: {"target": ..., "params": {...}}.

`target` may be the seed's dotted path (e.g. "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling")
or the bare class name; nested `*_config` params (discretization_config, guider_config,
scaling_config, sigma_sampler_config, loss_weighting_config, dyn_thresh_config) are
instantiated recursively and passed under the name without `_config`, so a seed yaml
maps 1:1 onto these objects.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import denoiser, discretization, guiders, loss, samplers, scaling, sigma_sampling, weighting

_MODULES = (scaling, weighting, sigma_sampling, discretization, denoiser, guiders, samplers, loss)
REGISTRY: dict[str, type] = {
    name: obj
    for module in _MODULES
    for name, obj in vars(module).items()
    if isinstance(obj, type) and obj.__module__ == module.__name__ and not name.startswith("_")
}


def to_plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> dict, recursively (also inside lists and tuples)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def instantiate_from_config(config: Mapping[str, Any] | None) -> Any:
    config = to_plain(config)
    if not isinstance(config, Mapping) or "target" not in config:
        raise ValueError(f"expected a config with a 'target' key, got {config!r}")
    name = str(config["target"]).rsplit(".", 1)[-1]
    if name not in REGISTRY:
        raise ValueError(f"unknown target {config['target']!r} in config; known: {', '.join(sorted(REGISTRY))}")
    kwargs = {}
    for key, value in dict(config.get("params") or {}).items():
        if key.endswith("_config") and value is not None:
            kwargs[key[: -len("_config")]] = instantiate_from_config(value)
        elif key in ("batch2model_keys", "device"):
            continue  # torch-only concerns
        else:
            kwargs[key] = value
    return REGISTRY[name](**kwargs)
