"""Distributed start-up for every entry point: the flags, and joining the job before any JAX call.

    sgm-train --config sdxl_finetune --coordinator-address 10.0.0.2:8476 --num-processes 4 --process-id 0

Without the flags, the variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
and without those jax's cluster detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes)
decide; on a plain machine the program runs as one process.
"""

from __future__ import annotations

import argparse

from sgm_jax.errors import UserError


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts (default: cluster detection, or one process)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, the same on every host (env JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (env JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    group.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="a host silent this long fails the job on every host (default 100 s)")


def start(args: argparse.Namespace) -> int:
    """Join the job described by the flags / environment; one `error:` line when that fails."""
    from sgm_jax.parallel import DistributedSpec, initialize_distributed

    try:
        spec = DistributedSpec.from_env(args.coordinator_address, args.num_processes, args.process_id,
                                        heartbeat_timeout=args.heartbeat_timeout)
        return initialize_distributed(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
