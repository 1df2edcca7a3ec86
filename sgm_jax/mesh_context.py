"""The mesh a program is traced on, for layers that pick a per-device form of their maths.

`traced_on(mesh, fn)` traces `fn` with the mesh as JAX's abstract mesh; below it, a network layer
reads how the batch splits and which platform the program is for (nn.attention: the TPU kernel once
per device's rows, the logits budget per device). Below `parallel` and `nn`, which both use it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

BATCH_AXES = ("data", "fsdp")  # the mesh's axes; a global batch is split over both


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
    """`fn`, traced with `mesh` as JAX's abstract mesh (jax.jit it as before). Layers that pick a
    per-device form read it through `traced_batch_split`: nn.attention runs the TPU kernel once per
    batch shard and sizes its logits budget per device."""

    @functools.wraps(fn)
    def on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def traced_batch_split(batch: int) -> tuple[str, ...] | None:
    """The axes of the traced program's abstract mesh (`traced_on`) that split a leading axis of
    `batch` rows over all of its devices: () outside a mesh or on one device; None when the mesh
    has several devices and `batch` does not divide over them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    return axes if shards == mesh.size and batch % shards == 0 else None


def traced_platform() -> str | None:
    """The platform ("tpu", "gpu", "cpu") of the traced program's abstract mesh; None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh.abstract_device.platform
