"""Loading a model to sample from: converted weights (SDXL, SD 2.1) or a train.py workdir.

One entry for sample.py and the demo. Every input is checked before anything compiles:
the config (by name or file), the converted-weights directory (its tree against the
config's: SD 2.1 weights with an SDXL config are one line naming the first differing key),
the tokenizer, LoRA files. `ModelCache` keeps loaded models (and so their compiled
functions) across requests, counting loads, so a server never reloads for a new prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from sgm_jax.checkpointing.checkpoint import first_mismatch
from sgm_jax.checkpointing.workdirs import read_workdir_config
from sgm_jax.config_files import config_name, load_config
from sgm_jax.convert.layout import engine_parts
from sgm_jax.errors import UserError
from sgm_jax.lora.files import parse_lora_spec
from sgm_jax.lora.merge import apply_loras

from .loading import check_checkpoint, load_checkpoint, load_clip_tokenizer
from .pipeline import Pipeline
from .workdir import TrainedModel, with_inference_section


def expected_param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """{'model.a.b': shape, ...} of every weight the converter writes for `config` (abstract only)."""
    out = {}
    for part in engine_parts(config):
        for path, shape in part.shapes.items():
            out[".".join(part.params_path + tuple(path))] = tuple(shape)
    return out


def check_params(params: Any, config: Any, source: str | os.PathLike, config_label: str) -> None:
    """UserError naming the first key where the converted weights and the config disagree."""
    got = {".".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    problem = first_mismatch(expected_param_shapes(config), got)
    if problem:
        raise UserError(f"the weights in {source} do not fit {config_label}: {problem} "
                        "(weights converted for another model?)")


def parse_loras(specs: Sequence[str]) -> list[tuple[str, float]]:
    """['style.safetensors:0.8', 'x.safetensors'] -> [(path, scale)]; every file must exist."""
    if not specs:
        return []

    out = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        if not Path(path).expanduser().is_file():
            raise UserError(f"LoRA file {path} not found")
        out.append((str(Path(path).expanduser()), scale))
    return out


def load_pipeline(config: Any, checkpoint: str | os.PathLike | None, *, config_label: str, name: str | None = None,
                  tokenizer: str | os.PathLike | None = None, dtype: str | None = None,
                  param_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                  step_progress: bool | None = None, loras: Sequence[tuple[str, float]] = (),
                  lora_strict: bool = True) -> Pipeline:
    """A Pipeline over converted weights; every problem is one line, raised before any compile."""

    checkpoint = checkpoint or (config.get("inference") or {}).get("checkpoint")
    path = check_checkpoint(checkpoint, config_label)
    clip_tokenizer = load_clip_tokenizer(config, tokenizer)
    params = load_checkpoint(path, config_label, param_dtype)
    check_params(params, config, path, config_label)
    if loras:
        params = apply_loras(params, list(loras), strict=lora_strict)
    return Pipeline(config, params, clip_tokenizer=clip_tokenizer, dtype=dtype, mesh=mesh,
                    name=name or config_name(config_label), step_progress=step_progress)


def load_workdir_config(workdir: str | os.PathLike) -> Any:
    """config.json of a train.py run, with its `inference` section (sampler defaults)."""
    return with_inference_section(Path(workdir), read_workdir_config(workdir))


@dataclass
class ModelCache:
    """Loaded models by (kind, location, options); `loads` counts real loads (tests assert on it)."""
    loads: int = 0
    models: dict[tuple, Any] = field(default_factory=dict)

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key not in self.models:
            self.models[key] = load()
            self.loads += 1
        return self.models[key]

    def pipeline(self, config_spec: str, checkpoint: str, **kw: Any) -> Pipeline:
        key = ("pipeline", str(config_spec), str(checkpoint), tuple(sorted((k, repr(v)) for k, v in kw.items())))
        return self.get(key, lambda: load_pipeline(load_config(config_spec), checkpoint,
                                                   config_label=str(config_spec), **kw))

    def trained(self, workdir: str, use_ema: bool = True, **kw: Any) -> TrainedModel:
        key = ("workdir", str(Path(workdir).resolve()), use_ema)
        return self.get(key, lambda: TrainedModel.load(workdir, use_ema=use_ema, **kw))

    def compiled(self) -> int:
        """How many sampling executables the cached models hold (one per sampler spec x batch shape)."""
        return sum(len(m.runner._executables) for m in self.models.values())


__all__ = ["ModelCache", "check_params", "expected_param_shapes", "load_pipeline",
           "load_workdir_config", "parse_loras"]
