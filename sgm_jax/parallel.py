"""Device mesh and shardings: data parallelism and FSDP-style parameter sharding.

The mesh has two axes: "data" (batch split, parameters replicated: what pmap users know)
and "fsdp" (batch split too, and every large parameter and its optimiser state split along
one dimension). Global batches are split over both axes. One code path serves one CPU, an
8-GPU host and a multi-host TPU slice: `initialize_distributed()` joins the hosts first.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# parameters smaller than this stay replicated: sharding them saves nothing and adds collectives
MIN_FSDP_SIZE = 2**14


def initialize_distributed() -> None:
    """jax.distributed.initialize() when launched on several hosts (cluster env detected)."""
    multi_host_env = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES", "TPU_WORKER_HOSTNAMES",
                      "MEGASCALE_COORDINATOR_ADDRESS")
    if any(os.environ.get(k) for k in multi_host_env) and jax.process_count() == 1:
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as err:  # a single-host TPU VM also sets TPU_* vars
            if "already" not in str(err).lower():
                print(f"jax.distributed.initialize() skipped: {err}")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Any = None) -> Mesh:
    """Mesh of shape (data, fsdp); -1 takes all remaining devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // max(fsdp, 1)
    if fsdp == -1:
        fsdp = n // max(data, 1)
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} available devices")
    return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Split the largest dimension divisible by the fsdp axis size; replicate small arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf of a params / optimiser-state tree (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size)), tree)


def global_batch_size_check(global_batch: int, mesh: Mesh) -> None:
    if global_batch % mesh.size:
        raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices of the mesh")


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of the global batch (numpy) -> global jax.Arrays split over the mesh.

    Non-array entries (e.g. prompt strings, kept for logging) are passed through unchanged.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local_batch.items():
        if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) >= 1 and np.asarray(v).dtype.kind in "biuf":
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
        else:
            out[k] = v
    return out
