"""LPIPS weights: torchvision's VGG16 file + the LPIPS linear heads -> one Orbax directory.

    python -m sgm_jax.convert.lpips --vgg vgg16-397923af.pth [--heads vgg.pth] [--output DIR]

--vgg:   torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, keys `features.<i>.weight`; found
         by default in $TORCH_HOME/hub/checkpoints or ~/.cache/torch/hub/checkpoints), or an
         LPIPS state dict with the backbone under `net.slice<k>.<i>.` (the seed's layout).
--heads: the LPIPS v0.1 heads (`lin<k>.model.1.weight`); default: `lpips/weights/v0.1/vgg.pth`
         of the installed `lpips` package (`pip install --no-deps lpips`: only its file is
         read), the same file as the seed's `vgg_lpips` (md5 d507d7349b931f0638a25a48a722f98a).
--output: default ~/.cache/sgm_jax/lpips, where sgm_jax.autoencoding.lpips looks.
`.pth` files are read with torch's weights-only unpickler (needs PyTorch); `.safetensors` too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.convert.common import FlaxPath, convert_state_dict, export_state_dict, flatten_params
from sgm_jax.convert.files import open_checkpoint
from sgm_jax.convert.params_dir import save_params
from sgm_jax.nn.lpips import LPIPS
from sgm_jax.errors import UserError, run_cli

ENV_VAR = "SGM_JAX_LPIPS"  # where sgm_jax.autoencoding.lpips looks first, then DEFAULT_DIR
DEFAULT_DIR = Path("~/.cache/sgm_jax/lpips")
VGG_FILE = "vgg16-397923af.pth"
HEADS_MD5 = "d507d7349b931f0638a25a48a722f98a"
# torchvision feature index -> the seed's LPIPS slice holding it (vgg16.slice1 = features[0:4], ...)
_SLICE_STARTS = (0, 4, 9, 16, 23)


def _slice_of(index: int) -> int:
    return max(k for k, start in enumerate(_SLICE_STARTS) if index >= start) + 1


def abstract_lpips_params() -> Mapping[str, Any]:
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda a: LPIPS().init(jax.random.key(0), a, a), x)["params"]


def lpips_key_map(params: Mapping[str, Any], seed_layout: bool = False) -> dict[FlaxPath, tuple[str, str]]:
    """{Flax path: (torch key, kind)}: `net/features_<i>` -> torchvision `features.<i>.` (or the
    seed's `net.slice<k>.<i>.` with seed_layout), `lin<k>/kernel` -> `lin<k>.model.1.weight`."""
    key_map = {}
    for path in flatten_params(params):
        leaf = "weight" if path[-1] == "kernel" else path[-1]
        if path[0] == "net":
            index = int(path[1].split("_")[1])
            module = f"net.slice{_slice_of(index)}.{index}" if seed_layout else f"features.{index}"
        else:
            module = f"{path[0]}.model.1"
        key_map[path] = (f"{module}.{leaf}", "conv" if path[-1] == "kernel" else "copy")
    return key_map


def _split(abstract: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"net": abstract["net"]}, {k: v for k, v in abstract.items() if k != "net"}


def convert_lpips(vgg_state_dict: Mapping[str, Any], heads_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """(VGG16 state dict, LPIPS heads state dict) -> LPIPS Flax params (numpy, float32).
    Raises CheckpointMismatchError listing missing / mis-shaped keys."""
    net, heads = _split(abstract_lpips_params())
    seed_layout = not any(k.startswith("features.") for k in vgg_state_dict)
    wanted = {k for k, _ in lpips_key_map(net, seed_layout).values()}
    backbone = {k: vgg_state_dict[k] for k in vgg_state_dict if k in wanted}  # classifier / heads ignored
    out = convert_state_dict(backbone, lpips_key_map(net, seed_layout), net, dtype=np.float32)
    lins = {k: heads_state_dict[k] for k in heads_state_dict if k.startswith("lin")}  # a full LPIPS dict has net.* too
    out.update(convert_state_dict(lins, lpips_key_map(heads), heads, dtype=np.float32))
    return out


def export_lpips(params: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of convert_lpips: (torchvision `features.*` dict, LPIPS `lin*` heads dict)."""
    net, heads = _split(params)
    return export_state_dict(net, lpips_key_map(net)), export_state_dict(heads, lpips_key_map(heads))


def default_heads_file() -> Path | None:
    """lpips/weights/v0.1/vgg.pth of the installed `lpips` package (found without importing
    it: it imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def default_vgg_file() -> Path | None:
    homes = [os.environ.get("TORCH_HOME", ""), "~/.cache/torch"]
    for home in homes:
        path = Path(home).expanduser() / "hub" / "checkpoints" / VGG_FILE
        if home and path.is_file():
            return path
    return None


def convert_lpips_files(vgg: str | Path | None, heads: str | Path | None, output: str | Path,
                        overwrite: bool = False) -> Path:

    vgg = Path(vgg) if vgg else default_vgg_file()
    heads = Path(heads) if heads else default_heads_file()
    if vgg is None:
        raise UserError(f"torchvision's VGG16 weights not found: pass --vgg {VGG_FILE} (from torchvision's model "
                        f"zoo; looked in $TORCH_HOME and ~/.cache/torch under hub/checkpoints)")
    if heads is None:
        raise UserError("LPIPS heads not found: `pip install --no-deps lpips` (ships weights/v0.1/vgg.pth) "
                        "or pass --heads vgg.pth")
    vgg_sd = open_checkpoint(vgg, allow_pickle=True)
    heads_sd = open_checkpoint(heads, allow_pickle=True)
    params = convert_lpips(vgg_sd, heads_sd)
    out = Path(output or DEFAULT_DIR).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_params(params, out, {"source": f"{vgg.name} + {heads.name}", "network": "lpips-vgg16"},
                       overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LPIPS (VGG16) weights -> an sgm_jax params directory")
    parser.add_argument("--vgg", help=f"torchvision's {VGG_FILE} (default: the torch hub cache)")
    parser.add_argument("--heads", help="LPIPS v0.1 vgg.pth heads (default: the installed lpips package's)")
    parser.add_argument("--output", default="", help="output directory (default ~/.cache/sgm_jax/lpips)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    run_cli(lambda: print(convert_lpips_files(args.vgg, args.heads, args.output, args.overwrite)))


if __name__ == "__main__":
    main()
