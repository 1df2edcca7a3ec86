"""What a train.py workdir holds, read without its trainer: the config it trained (config.json)
and, for an autoencoder's workdir or a converted directory, the first stage a latent model loads.

    first_stage_config, params = load_first_stage("workdir/autoencoder_mnist")  # EMA when kept

`ckpt_path` is a train.py workdir of an autoencoder config (config.json + checkpoints/<step>/)
or a converted directory (sgm_jax.convert's Orbax params directory holding `first_stage`; its
metadata.json gives the first_stage_config when it was written by `save_first_stage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from ml_collections import ConfigDict

from sgm_jax.convert.params_dir import load_params, read_metadata
from sgm_jax.diffusion.registry import to_plain
from sgm_jax.errors import UserError

from .checkpoint import restore_params

FIRST_STAGE = "first_stage"


def read_workdir_config(workdir: str | Path) -> ConfigDict:
    """config.json of a diffusion model's train.py run; an autoencoder's run is one line saying what it is for."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.py --workdir?")
    config = ConfigDict(json.loads(path.read_text()))
    model = config.get("model") or {}
    params = model.get("params") or {}
    autoencoder = "encoder_config" in params or "autoencod" in str(model.get("target", "")).lower()
    if autoencoder and "network_config" not in params:
        raise UserError(f"{workdir} holds an autoencoder (a first stage), which has no sampler: use it as a latent "
                        f"model's first stage (--config.model.params.first_stage_config.params.ckpt_path={workdir}) "
                        f"or export it (python -m sgm_jax.autoencoding.firststage {workdir} --safetensors FILE)")
    return config


def first_stage_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The seed-style `{"target", "params"}` that builds this autoencoder for inference (the
    loss and optimiser parts dropped, `lossconfig: torch.nn.Identity` as the seed's latent
    configs write it): what a latent model's first_stage_config holds."""
    cfg = to_plain(model_config)
    params = dict(cfg.get("params", {}))
    keep = ("encoder_config", "decoder_config", "regularizer_config") if "encoder_config" in params else (
        "embed_dim", "ddconfig")
    out = {k: params[k] for k in keep if k in params}
    out["lossconfig" if "ddconfig" in out else "loss_config"] = {"target": "torch.nn.Identity"}
    return {"target": cfg["target"], "params": out}


def _workdir_config(workdir: Path) -> Any:
    return ConfigDict(json.loads((workdir / "config.json").read_text()))


def load_first_stage(ckpt_path: str | Path, *, use_ema: bool = True, step: int | None = None
                     ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(first_stage_config `{"target", "params"}` in the seed's layout, Flax params as numpy)
    for `sgm_jax.nn.vae.autoencoder_from_config(first_stage_config)`. first_stage_config is None
    for a converted directory that does not record it (e.g. a whole SDXL conversion: its model
    config says what the first stage is)."""
    path = Path(ckpt_path).expanduser()
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        config = _workdir_config(path)
        target = str(config.model.target).rsplit(".", 1)[-1]
        if target not in ("AutoencodingEngine", "AutoencoderKL", "AutoencodingEngineLegacy"):
            raise UserError(f"{path} trained a {target}, not an autoencoder: point first_stage_config.params."
                            "ckpt_path at an autoencoder workdir or a converted checkpoint directory")
        _, params = restore_params(path / "checkpoints", step=step, use_ema=use_ema)
        if "autoencoder" in params:  # the raw weights: {"autoencoder", "logvar"}; the EMA is the autoencoder alone
            params = params["autoencoder"]
        return first_stage_config(config.model), _to_numpy(params)
    if (path / "metadata.json").is_file():
        meta = read_metadata(path)
        tree = load_params(path)
        if FIRST_STAGE not in tree:
            raise UserError(f"{path} holds no first stage (parts: {', '.join(sorted(tree))})")
        return meta.get("first_stage_config"), tree[FIRST_STAGE]
    raise UserError(f"{path} is neither an autoencoder train.py workdir (config.json + checkpoints/) nor a "
                    "converted checkpoint directory (metadata.json)")


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)
