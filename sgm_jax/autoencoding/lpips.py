"""Where the LPIPS network's (sgm_jax.nn.lpips) weights are looked up, and loading them.

Two files that cannot be downloaded here. `python -m sgm_jax.convert.lpips` turns torchvision's
`vgg16-397923af.pth` plus the `lpips` package's `weights/v0.1/vgg.pth` heads into an Orbax
directory, looked up by `find_lpips_weights`: $SGM_JAX_LPIPS, then ~/.cache/sgm_jax/lpips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from sgm_jax.convert.lpips import DEFAULT_DIR, ENV_VAR
from sgm_jax.errors import UserError
from sgm_jax.convert.params_dir import load_params


def find_lpips_weights() -> Path | None:
    """The converted LPIPS directory ($SGM_JAX_LPIPS, then ~/.cache/sgm_jax/lpips), or None."""
    candidates = [os.environ.get(ENV_VAR, ""), str(DEFAULT_DIR)]
    for c in candidates:
        if c and (Path(c).expanduser() / "metadata.json").is_file():
            return Path(c).expanduser()
    return None


MISSING_WEIGHTS = (
    "LPIPS weights not found (looked in ${env} and {default}): convert torchvision's VGG16 file with "
    "`python -m sgm_jax.convert.lpips --vgg vgg16-397923af.pth --output {default}` (the LPIPS heads come from "
    "the `lpips` package), or set model.params.loss_config.params.perceptual_weight=0"
)


def load_lpips_params(path: str | os.PathLike | None = None) -> Mapping[str, Any]:
    """LPIPS params `{"net": ..., "lin0": ..., ...}` from a converted directory (default:
    `find_lpips_weights()`); raises UserError with one line saying where to put them."""

    found = Path(path).expanduser() if path else find_lpips_weights()
    if found is None or not (found / "metadata.json").is_file():
        raise UserError(MISSING_WEIGHTS.format(env=ENV_VAR, default=DEFAULT_DIR))
    return load_params(found, dtype="float32")
