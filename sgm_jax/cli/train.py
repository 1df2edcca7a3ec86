"""sgm-train / python -m sgm_jax.train / python train.py: train a diffusion model.

    sgm-train --config mnist_cond --workdir workdir/mnist_cond --config.training.max_minutes=30

--config: a config file, or the name of one shipped with sgm_jax (default mnist_cond_cpu, the
10-minute CPU run); --config.a.b=v overrides any field. The config and every override are
checked before anything is created: a bad one is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from sgm_jax.training.loop import train

from . import distributed
from .configs import (
    ArgumentParser,
    apply_overrides,
    load_config,
    packaged_config_names,
    split_overrides,
)

DEFAULT_CONFIG = "mnist_cond_cpu"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sgm-train", description=__doc__.split("\n\n")[0],
                                epilog="configs shipped with sgm_jax: " + ", ".join(packaged_config_names()) +
                                "\noverrides: --config.FIELD.PATH=VALUE (any field of the config)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"config file or shipped config name (default {DEFAULT_CONFIG})")
    p.add_argument("--workdir", help="checkpoints, metrics, samples and the resolved config go here "
                                     "(default: workdir/<config.training.name>); on several hosts, one shared "
                                     "folder (NFS, Filestore, gcsfuse) that every host sees")
    distributed.add_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    distributed.run_job(lambda: run(args.config, overrides, args.workdir, args), hard_exit=argv is None)


def run(config_spec: str, overrides: list[tuple[str, str]], workdir: str | None,
        args: argparse.Namespace | None = None) -> int:
    config = apply_overrides(load_config(config_spec), overrides)  # before anything touches the disk
    if hasattr(config, "lock"):  # a ConfigDict: no code below adds a field the config does not declare
        config.lock()
    distributed.start(args or build_parser().parse_args([]))  # before any other JAX call
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

    train(config, workdir or str(Path("workdir") / config.training.name))
    return 0


if __name__ == "__main__":
    main()
