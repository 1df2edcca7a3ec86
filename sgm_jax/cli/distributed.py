"""Distributed start-up for every entry point: the flags, and joining the job before any JAX call.

    sgm-train --config sdxl_finetune --coordinator-address 10.0.0.2:8476 --num-processes 4 --process-id 0

Without the flags, the variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
and without those jax's cluster detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes)
decide; on a plain machine the program runs as one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn

from sgm_jax.errors import UserError, run_cli
from sgm_jax.multihost import PeerWatch, lost_peer
from sgm_jax.parallel import DistributedSpec, initialize_distributed


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts (default: cluster detection, or one process)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, the same on every host (env JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (env JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    group.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="a host silent this long fails the job on every host (default 100 s)")
    group.add_argument("--initialization-timeout", type=int, default=300, metavar="S",
                       help="how long the hosts wait for each other at the start (default 300 s)")


def start(args: argparse.Namespace) -> int:
    """Join the job described by the flags / environment; one `error:` line when that fails."""

    try:
        spec = DistributedSpec.from_env(args.coordinator_address, args.num_processes, args.process_id,
                                        heartbeat_timeout=args.heartbeat_timeout,
                                        initialization_timeout=args.initialization_timeout)
        count = initialize_distributed(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    if count > 1:
        import atexit


        # half jax's heartbeat timeout: this one line comes before jax's abort would
        watch = PeerWatch(max(spec.heartbeat_timeout / 2, 5.0), _lost).start()
        atexit.register(watch.stop)  # runs before jax's own shutdown (registered earlier)
        _quiet_lost_peer_threads()
    return count


def _quiet_lost_peer_threads() -> None:
    """Background threads (Orbax's save and restore) that fail because a host is gone print no
    traceback: the main thread meets the same failure and says it in one line."""
    import threading

    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and lost_peer(args.exc_value) and os.environ.get("SGM_JAX_TRACEBACK") != "1":
            return
        default(args)

    threading.excepthook = hook


def _lost_message(reason: str) -> str:
    return (f"lost contact with another host of this job ({reason}); the last checkpoint is kept: "
            "start the same command on every host again to resume")


def _lost(reason: str) -> None:
    # from the watch thread, while the main thread's progress bar may be mid-line: start a new one
    print(f"\nerror: {_lost_message(reason)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(4)


def run_job(main: Callable[[], int | None], hard_exit: bool = False) -> NoReturn:
    """`errors.run_cli` for a job that may span hosts: a host that lost its peers says so in one
    line; a failing host exits at once (jax's shutdown would wait for, then abort on, the peers
    that are gone), while a run that ends well leaves through jax's shutdown barrier.
    hard_exit (a real command line, not a test calling main()): a failing single process exits at
    once too, since Orbax's leftover writes of a failed save echo from interpreter finalization."""

    def guarded() -> int | None:
        try:
            return main()
        except Exception as e:
            if _process_count() > 1 and lost_peer(e) and os.environ.get("SGM_JAX_TRACEBACK") != "1":
                first = " ".join(str(e).split())[:160]
                raise UserError(_lost_message(first), exit_code=4) from None
            raise

    try:
        run_cli(guarded)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BaseException:  # SGM_JAX_TRACEBACK=1, or not a user error: the traceback, then the same exit
        if _process_count() <= 1 and not hard_exit:
            raise
        traceback.print_exc()
        code = 1
    if code and (hard_exit or _process_count() > 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _process_count() -> int:
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1
