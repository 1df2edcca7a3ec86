"""One host of a 2-process job (tests/test_multihost.py): the later host starts compiling
`skew` seconds after the other, then both run a sum over all 4 devices of the job.

    python tests/compile_together_worker.py OUT_DIR SKEW_S --coordinator-address ... --process-id I

Writes OUT_DIR/host<I>.json: when it began compiling, when compile_together returned, the sum.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sgm_jax.cli import distributed

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("skew", type=float)
distributed.add_flags(parser)
args = parser.parse_args()
distributed.start(args)

import jax  # noqa: E402  (after the job is joined, as in every entry point)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from sgm_jax import multihost  # noqa: E402

mesh = jax.make_mesh((jax.device_count(),), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
me = jax.process_index()
local = np.arange(4, dtype=np.float32)[me * 2: me * 2 + 2] + 1.0  # the global row is 1, 2, 3, 4
x = jax.make_array_from_process_local_data(sharding, local, (4,))
total = jax.jit(lambda v: jnp.sum(v * v), out_shardings=NamedSharding(mesh, PartitionSpec()))
if me == 1:
    time.sleep(args.skew)
began = time.time()
multihost.compile_together(total, x, name="sum")
returned = time.time()
value = float(total(x))
Path(args.out, f"host{me}.json").write_text(json.dumps({"began": began, "returned": returned, "sum": value}))
