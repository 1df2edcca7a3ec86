"""pytorch-fid's FID InceptionV3 weights (`pt_inception-2015-12-05-6726825d.pth`, torchvision's
Inception3 key layout: `Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`) <-> Flax params
of `sgm_jax.nn.inception.FIDInceptionV3`.

The file also holds the 1008-way classifier (`fc.*`), unused by FID (pool3 features), and may
hold batch-norm `num_batches_tracked` counters; both are ignored. A `.safetensors` file written
from `export_inception` is read too (no PyTorch needed then).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sgm_jax.convert.common import KeyMap, convert_state_dict, export_state_dict, flatten_params
from sgm_jax.convert.vae import torch_leaf
from sgm_jax.nn.inception import abstract_inception_params
from sgm_jax.convert.files import open_checkpoint

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
ENV_VAR = "SGM_JAX_FID_WEIGHTS"
_IGNORED = ("num_batches_tracked", "fc.weight", "fc.bias")


def inception_key_map(params: Mapping[str, Any]) -> KeyMap:
    """{Flax path: (torch key, kind)}: module names are the torch ones; conv `kernel` ->
    `weight`, batch-norm `scale` -> `weight`, `bias` / `running_mean` / `running_var` as is."""
    key_map = {}
    for path, value in flatten_params(params).items():
        leaf, kind = torch_leaf(path[-1], len(value.shape))
        key_map[path] = (".".join(list(path[:-1]) + [leaf]), kind)
    return key_map


def _abstract() -> dict[str, Any]:
    return abstract_inception_params()


def convert_inception(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Inception3-layout state dict -> FIDInceptionV3 params (float32 numpy). Raises
    CheckpointMismatchError listing missing / unexpected / mis-shaped keys."""
    abstract = _abstract()
    ignored = {k for k in state_dict if k.endswith(_IGNORED)}
    return convert_state_dict(state_dict, inception_key_map(abstract), abstract, ignore_unexpected=tuple(ignored),
                              dtype="float32")


def export_inception(params: Mapping[str, Any]) -> dict[str, Any]:
    """FIDInceptionV3 params -> Inception3-layout state dict (numpy, torch layouts) that
    pytorch-fid loads; its 1008-way `fc` classifier, unused by FID, is written as zeros."""
    state_dict = export_state_dict(params, inception_key_map(params))
    state_dict["fc.weight"] = np.zeros((1008, 2048), np.float32)
    state_dict["fc.bias"] = np.zeros((1008,), np.float32)
    return state_dict


def default_weight_paths() -> list[Path]:
    """Where the weights are looked for: $SGM_JAX_FID_WEIGHTS, then the torch hub cache that
    pytorch-fid downloads into, then ~/.cache/sgm_jax/."""
    paths = []
    if os.environ.get(ENV_VAR):
        paths.append(Path(os.environ[ENV_VAR]).expanduser())
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    paths.append(torch_home.expanduser() / "hub" / "checkpoints" / FID_WEIGHTS_NAME)
    paths.append(Path("~/.cache/sgm_jax").expanduser() / FID_WEIGHTS_NAME)
    return paths


def load_inception_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """FIDInceptionV3 params from pytorch-fid's `.pth` (read with torch's weights_only loader)
    or an exported `.safetensors`; `path=None` searches `default_weight_paths()`.
    Raises FileNotFoundError with one line saying which file to put where."""

    candidates = [Path(path)] if path is not None else default_weight_paths()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"FID InceptionV3 weights not found: put pytorch-fid's {FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}) at "
            f"{candidates[-1] if path is None else candidates[0]} or point ${ENV_VAR} at it")
    checkpoint = open_checkpoint(found, allow_pickle=True)  # the released file is a trusted torch pickle
    return convert_inception(checkpoint)
