"""python -m sgm_jax.cli.preencode / sgm-preencode: pre-encode a latent model's training data once
(the first stage's moments and the frozen embedders' outputs, into tar shards; sgm_jax.training.preencode).

    python -m sgm_jax.cli.preencode --config configs/sdxl_finetune.py --out data/sdxl_pre \
        --config.model.params.ckpt_path=checkpoints/sd_xl_base --config.data.params.train.datapipeline.urls=...
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import logging

from sgm_jax import multihost
from sgm_jax.training.preencode import STORE_DTYPES, preencode

from . import distributed
from .configs import ArgumentParser, apply_overrides, load_config, split_overrides


def main(argv: Sequence[str] | None = None) -> None:
    """python -m sgm_jax.cli.preencode --config CONFIG --out DIR [--dtype float16] [--config.a.b=v ...]"""
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="python -m sgm_jax.cli.preencode", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training config (file or shipped name)")
    p.add_argument("--out", required=True, help="folder for the pre-encoded shards")
    p.add_argument("--dtype", default="float32", choices=tuple(STORE_DTYPES), help="stored moments / embeddings")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--name", default="preencoded", help="shard file prefix: <name>-000000.tar")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of that name")
    distributed.add_flags(p)
    args = p.parse_args(rest)

    def run() -> int:
        config = apply_overrides(load_config(args.config), overrides)
        distributed.start(args)  # before any other JAX call; each host then encodes its own shards
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
        r = preencode(config, args.out, dtype=args.dtype, samples_per_shard=args.samples_per_shard, name=args.name,
                      overwrite=args.overwrite)
        skipped = sum(v for k, v in r["skipped"].items() if k != "truncated_shards")
        if not multihost.is_main():
            return 0
        print(f"wrote {r['samples']} samples in {len(r['paths'])} shards (frozen embedders stored: "
              f"{r['stored_embedders'] or 'none'}){f'; skipped {skipped} bad samples' if skipped else ''}")
        print(f"train from them with the same config and --config.data.params.train.datapipeline.urls='{r['urls']}' "
              "--config.data.params.train.datapipeline.preencoded=True")
        return 0

    distributed.run_job(run)


if __name__ == "__main__":
    main()
