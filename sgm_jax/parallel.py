"""Device mesh and shardings: data parallelism and FSDP-style parameter sharding.

The mesh has two axes: "data" (batch split, parameters replicated: what pmap users know)
and "fsdp" (batch split too, and every large parameter and its optimiser state split along
one dimension). Global batches are split over both axes. One code path serves one CPU, an
8-GPU host and a multi-host TPU slice: `initialize_distributed()` joins the hosts first.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgm_jax import xla_cpu
from sgm_jax.mesh_context import BATCH_AXES

# parameters smaller than this stay replicated: sharding them saves nothing and adds collectives
MIN_FSDP_SIZE = 2**14
# XLA:TPU's SPMD partitioner turns a matmul whose weight is FSDP-split into a loop of partial matmuls that pass
# the weight's shards round the chips ("collective matmul", windowed einsum) once the operands pass a size; a
# threshold out of reach keeps the plain all-gather (MaxText's xla_flags_library.DISABLE_COLLECTIVE_MATMUL)
NO_COLLECTIVE_MATMUL = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1_000_000}


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How this process joins the others. Explicit settings (flags, or the variables
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) win; without them jax's own
    cluster detection decides (Cloud TPU, SLURM, Open MPI, Kubernetes); neither: one process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds the first contact may take (jax's default)
    heartbeat_timeout: int = 100       # seconds without a peer's heartbeat before the job is failed

    @classmethod
    def from_env(cls, coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, **timeouts: int) -> "DistributedSpec":
        def env_int(name: str) -> int | None:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None

        return cls(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
                   num_processes if num_processes is not None else env_int("JAX_NUM_PROCESSES"),
                   process_id if process_id is not None else env_int("JAX_PROCESS_ID"),
                   **{k: int(v) for k, v in timeouts.items() if v is not None})

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))

    def check(self) -> None:
        """ValueError naming the missing / wrong setting of an explicit multi-process start."""
        if not self.explicit or self.num_processes == 1:
            return
        missing = [flag for flag, v in (("--coordinator-address / JAX_COORDINATOR_ADDRESS", self.coordinator_address),
                                        ("--num-processes / JAX_NUM_PROCESSES", self.num_processes),
                                        ("--process-id / JAX_PROCESS_ID", self.process_id)) if v is None]
        if missing:
            raise ValueError(f"several processes need all three settings: {', '.join(missing)} not given")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process id {self.process_id} is not in [0, {self.num_processes})")
        if ":" not in self.coordinator_address:
            raise ValueError(f"coordinator address {self.coordinator_address!r} needs a port: HOST:PORT")


def detected_cluster() -> str | None:
    """The name of the cluster environment jax would join through (no JAX call, no network
    beyond what jax's own detection does), or None on a plain machine."""
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def initialize_distributed(spec: DistributedSpec | None = None) -> int:
    """Join the job's processes; call first, before any other JAX call. Returns the process count.

    A requested multi-process start that fails raises ValueError (one line): a run never goes
    on alone when it was asked to run with others."""
    spec = DistributedSpec.from_env() if spec is None else spec
    spec.check()
    if jax.distributed.is_initialized():
        return jax.process_count()
    if spec.explicit and spec.num_processes == 1:
        return 1
    cluster = None if spec.explicit else detected_cluster()
    if not spec.explicit and cluster is None:
        return 1
    xla_cpu.apply_cpu_defaults(flags=xla_cpu.MULTI_PROCESS_FLAGS)  # read when the CPU backend starts, below
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # CPU devices of several processes talk through gloo (GPU / TPU backends ignore this)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (f"{spec.num_processes} processes at {spec.coordinator_address} (this is {spec.process_id})"
             if spec.explicit else f"the {cluster} job")
    kwargs = dict(initialization_timeout=spec.initialization_timeout,
                  heartbeat_timeout_seconds=spec.heartbeat_timeout)
    if spec.explicit:
        kwargs.update(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                      process_id=spec.process_id, cluster_detection_method="deactivate")
    if spec.explicit and spec.process_id:
        # jax aborts with a C++ trace when the coordinator never answers: find that out first
        _wait_for_coordinator(spec.coordinator_address, spec.initialization_timeout, where)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # noqa: BLE001 (jax raises RuntimeError / XlaRuntimeError / ValueError)
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"could not join {where}: {reason}") from None
    return jax.process_count()


def _wait_for_coordinator(address: str, timeout: float, where: str) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise ValueError(f"could not join {where}: nothing answers at {address} after {timeout:.0f} s "
                                 f"({err.strerror or err}); start process 0 there first, or fix the address") from None
            time.sleep(0.5)


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


def compiler_options(mesh_config: Mapping[str, Any], mesh: Mesh) -> dict[str, Any] | None:
    """XLA options for a step jitted on `mesh`, from the config's mesh section: on TPU, `collective_matmul:
    False` keeps XLA:TPU from splitting matmuls over FSDP-split weights into collective-permute loops
    (SDXL's fine-tune on v6e-8: they re-read each activation per weight shard). Other platforms: none."""
    if bool(mesh_config.get("collective_matmul", True)) or mesh.devices.flat[0].platform != "tpu":
        return None
    return dict(NO_COLLECTIVE_MATMUL)


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


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[k, B, ...] (k micro-batches of gradient accumulation): each micro-batch split over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh, stacked: bool = False) -> dict[str, jax.Array]:
    """This host's slice of the global batch (numpy) -> global jax.Arrays split over the mesh.

    Non-array entries (e.g. prompt strings, kept for logging) are passed through unchanged.
    `stacked`: the arrays are [k, B_local, ...] micro-batches, split along B.
    """
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    out = {}
    for k, v in local_batch.items():
        if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) >= 1 and np.asarray(v).dtype.kind in "biuf":
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
        else:
            out[k] = v
    return out
