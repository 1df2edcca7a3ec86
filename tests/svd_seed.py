"""What tests/make_svd_fixtures.py (run once beside the seed's own code) and
tests/test_svd_seed_parity.py share: where the fixtures live, the random-weight recipe, and the
seed-side settings of configs/inference/tiny_svd.py.

The fixtures keep no weights: each holds its modules' state-dict keys and shapes in order, and
both sides draw the same float32 values from numpy (`random_state_dict`), so the seed's modules and
ours run the same random network without megabytes of tensors in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "data" / "svd_seed"
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference" / "tiny_svd.py"
# tiny_svd's image tower as an open_clip model config (the seed's embedder builds open_clip models by
# name); its unused text side is kept small: the seed deletes only the text transformer.
TINY_TOWER_ARCH = "sgm-jax-tiny-svd-vit"
TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
# the trajectory's request (simple_video_sample.py's arguments)
REQUEST = {"num_frames": 3, "fps_id": 6, "motion_bucket_id": 127, "cond_aug": 0.02, "decoding_t": 2}


def open_clip_config(tower: dict[str, Any]) -> dict[str, Any]:
    """CLIPVisionTower fields (sgm_jax.nn.clip_vision) -> the open_clip model config of that tower."""
    if tower.get("act", "gelu") != "gelu":
        raise ValueError("open_clip's ViTs use exact GELU; a tower with another activation has no open_clip twin")
    return {"embed_dim": tower["embed_dim"], "text_cfg": TINY_TEXT_CFG,
            "vision_cfg": {"image_size": tower["image_size"], "patch_size": tower["patch_size"],
                           "width": tower["width"], "layers": tower["layers"],
                           "head_width": tower["width"] // tower["heads"]}}


def random_state_dict(keys: Sequence[tuple[str, Sequence[int]]], seed: int) -> dict[str, np.ndarray]:
    """{key: float32 array} drawn in the given key order. Weights ~ N(0, 1/fan_in) so that deep random
    networks neither vanish nor blow up; norm scales 1 + N(0, 0.1^2) and biases N(0, 0.1^2) (never the
    seed's zero or unit initialisations, which would hide errors); the video blocks' mix factors
    N(0, 1), far enough from 0 that sigmoid(mix) is not 1/2."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in keys:
        shape = tuple(int(s) for s in shape)
        noise = rng.standard_normal(shape).astype(np.float32)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "mix_factor":
            value = noise
        elif len(shape) >= 2:
            value = noise / np.float32(np.sqrt(np.prod(shape[1:])))
        elif leaf == "weight" or leaf == "gamma":
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = np.asarray(value, np.float32).reshape(shape)
    return out


def load_fixture(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the JSON record, the arrays) of one fixture: `<name>.json` and `<name>.npz`."""
    record = json.loads((FIXTURES / f"{name}.json").read_text())
    with np.load(FIXTURES / f"{name}.npz") as arrays:
        return record, {k: arrays[k] for k in arrays.files}
