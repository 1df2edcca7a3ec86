"""Convert a PyTorch checkpoint of the seed into an sgm_jax params directory, or back.

    python convert_torch_weights.py --config configs/inference/sd_xl_base.py \
        --checkpoint sd_xl_base_1.0.safetensors --output checkpoints/sd_xl_base

Installed as `sgm-convert`; the command line lives in sgm_jax/cli/convert.py (--help for the flags).
"""

import sys

from sgm_jax.cli.convert import main, parse_args, run  # noqa: F401  (importable, as before)

if __name__ == "__main__":
    sys.exit(main())
