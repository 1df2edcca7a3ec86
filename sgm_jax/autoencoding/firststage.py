"""A trained autoencoder's seed-layout export (reading it as a latent model's frozen first stage:
sgm_jax.checkpointing.workdirs.load_first_stage).

    export_first_stage("workdir/autoencoder_mnist", "mnist_ae.safetensors")    # first_stage_model.*
    save_first_stage("workdir/autoencoder_mnist", "checkpoints/mnist_ae")     # converted directory

    python -m sgm_jax.autoencoding.firststage WORKDIR --safetensors OUT.safetensors [--directory DIR]

`ckpt_path` is a train.py workdir of an autoencoder config (config.json + checkpoints/<step>/)
or a converted directory (sgm_jax.convert's Orbax params directory holding `first_stage`; its
metadata.json gives the first_stage_config when it was written by `save_first_stage`).
The exported keys are those of the seed's first-stage module: `encoder.*`, `decoder.*` and,
for AutoencoderKL, `quant_conv.*` / `post_quant_conv.*`, under `first_stage_model.`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sgm_jax.checkpointing.workdirs import FIRST_STAGE, load_first_stage
from sgm_jax.errors import UserError, run_cli
from sgm_jax.convert.params_dir import save_params
from sgm_jax.convert.files import save_safetensors
from sgm_jax.nn.vae import autoencoder_from_config
from sgm_jax.convert.vae import VAE_PREFIX, convert_vae, export_vae


def first_stage_state_dict(first_stage_config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> `{first_stage_model.<seed key>: array}` (PyTorch layouts), validated against
    the module `first_stage_config` builds (every key present, every shape right)."""

    model = autoencoder_from_config(first_stage_config)
    state_dict = export_vae(params, prefix=VAE_PREFIX)
    convert_vae(state_dict, model)  # raises CheckpointMismatchError listing any difference
    return state_dict


def export_first_stage(ckpt_path: str | Path, out_file: str | Path, *, use_ema: bool = True,
                       overwrite: bool = False) -> Path:
    """A trained autoencoder (workdir or converted directory) -> seed-layout `.safetensors`
    with `first_stage_model.*` keys; its first_stage_config is stored in the file's metadata."""

    config, params = load_first_stage(ckpt_path, use_ema=use_ema)
    if config is None:
        raise UserError(f"{ckpt_path} does not record its first_stage_config; export it with the engine converter")
    state_dict = first_stage_state_dict(config, params)
    return save_safetensors(state_dict, out_file, {"first_stage_config": json.dumps(config),
                                                   "source": str(ckpt_path)}, overwrite=overwrite)


def save_first_stage(ckpt_path: str | Path, out_dir: str | Path, *, use_ema: bool = True,
                     overwrite: bool = False) -> Path:
    """A trained autoencoder workdir -> converted directory `{"first_stage": params}` whose
    metadata.json records first_stage_config (what `load_first_stage` reads back)."""

    config, params = load_first_stage(ckpt_path, use_ema=use_ema)
    return save_params({FIRST_STAGE: params}, out_dir, {"first_stage_config": config, "source": str(ckpt_path)},
                       overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="autoencoder train.py workdir or converted directory")
    parser.add_argument("--safetensors", help="write a seed-layout first_stage_model.* .safetensors file")
    parser.add_argument("--directory", help="write a converted directory (for first_stage_config.params.ckpt_path)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights even when an EMA was kept")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    def run() -> None:
        if not (args.safetensors or args.directory):
            raise UserError("nothing to do: pass --safetensors FILE and/or --directory DIR")
        if args.safetensors:
            print(export_first_stage(args.source, args.safetensors, use_ema=not args.no_ema, overwrite=args.overwrite))
        if args.directory:
            print(save_first_stage(args.source, args.directory, use_ema=not args.no_ema, overwrite=args.overwrite))

    run_cli(run)


if __name__ == "__main__":
    main()
