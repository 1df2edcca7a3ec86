"""TrainState and what the seed's DiffusionEngine.configure_optimizers trains (its optimiser and
LitEma: sgm_jax.optim)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from sgm_jax.nn.conditioner import GeneralConditioner, trainable_mask


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"model": ..., "conditioner": ...}; float32
    opt_state: Any
    ema_params: Any = None  # same tree as params when EMA is on


def trainable_tree(conditioner: GeneralConditioner, params: Any) -> Any:
    """make_optimizer's `trainable` for {"model", "conditioner", ...} params (concrete or abstract):
    the whole UNet and the embedders marked is_trainable, as the seed's configure_optimizers."""
    return {"model": jax.tree_util.tree_map(lambda _: True, params["model"]),
            "conditioner": trainable_mask(conditioner, params["conditioner"])}
