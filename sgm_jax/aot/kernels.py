"""The work of the Pallas kernels in a traced step, which XLA's cost analysis does not count.

XLA:TPU sees a Mosaic kernel as one opaque custom call: its FLOPs are missing from
`cost_analysis()`, and its bytes are only what the call's operands cost XLA, not the kernel's own
block re-reads. The splash attention kernels (nn.attention's TPU default) are counted here from their
operand shapes, as the matmuls and HBM reads their blocks make:

- forward: q k^T and p v (2 matmuls of T x S x d per batch row and head); K and V read once per
  block of queries;
- backward: the dK/dV kernel recomputes q k^T and does dO v^T, p^T dO, dS^T q (4), K-side blocks
  resident, Q and dO read once per block of keys; the dQ kernel recomputes q k^T and does dO v^T,
  dS k (3), K and V read once per block of queries.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.nn.attention import SPLASH_BLOCK

# kernel name prefix -> (T x S x d matmuls per row and head, which side is re-read per block of the other)
SPLASH_KERNELS = {"splash_mha_fwd": (2, "kv"), "splash_mha_dkv": (4, "q"), "splash_mha_dq": (3, "kv")}


def _bytes(aval: Any) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _splash_cost(eqn: Any) -> tuple[float, float] | None:
    name = str(eqn.params.get("name", ""))
    kind = next((k for k in SPLASH_KERNELS if name.startswith(k)), None)
    if kind is None or eqn.params.get("interpret"):
        return None
    matmuls, reread = SPLASH_KERNELS[kind]
    # after the mask's int32 block tables: q, k, v `[..., T or S, d]`
    q, k, v = [x.aval for x in eqn.invars if jnp.issubdtype(x.aval.dtype, jnp.floating)][:3]
    rows_t, s, d = int(math.prod(q.shape[:-1])), k.shape[-2], q.shape[-1]
    flops = 2.0 * matmuls * rows_t * s * d
    once = sum(_bytes(x.aval) for x in eqn.invars) + sum(_bytes(a) for a in eqn.params["out_avals"])
    t = q.shape[-2]
    if reread == "kv":  # K and V again for every further block of queries
        again = (t // min(SPLASH_BLOCK, t) - 1) * (_bytes(k) + _bytes(v))
    else:  # Q and dO (q's shape) again for every further block of keys
        again = (s // min(SPLASH_BLOCK, s) - 1) * 2 * _bytes(q)
    return flops, float(once + again)


def kernel_cost(jaxpr: Any) -> dict[str, float]:
    """{"calls", "flops", "bytes_accessed"} of the splash kernels a traced step runs, per device (inside a
    shard_map the shapes are one device's). Loops multiply by their trip count; of a cond's branches the
    costliest counts (platform_dependent's non-TPU branch is the interpret-mode twin, not counted)."""
    total = {"calls": 0.0, "flops": 0.0, "bytes_accessed": 0.0}
    for eqn in [] if jaxpr is None else jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            cost = _splash_cost(eqn)
            if cost is not None:
                total["calls"] += 1
                total["flops"] += cost[0]
                total["bytes_accessed"] += cost[1]
            continue
        subs = [kernel_cost(sub) for sub in _sub_jaxprs(eqn)]
        if not subs:
            continue
        if eqn.primitive.name == "cond":
            subs = [max(subs, key=lambda c: c["flops"])]
        times = float(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1.0
        for c in subs:
            for key in total:
                total[key] += times * c[key]
    return total


def _sub_jaxprs(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append(item)
    return found
