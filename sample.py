"""Sample images: SDXL / SD 2.1 from converted weights, or a model trained with train.py.

    python sample.py --config configs/inference/sd_xl_base.py --checkpoint checkpoints/sd_xl_base \
        --prompt "an astronaut riding a horse" --num 4 --steps 40 --seed 42 --out outputs/
    python sample.py --workdir workdir/mnist_cond_cpu --classes 0,1,2 --num 4 --out grid.png

Installed as `sgm-sample`; the command line lives in sgm_jax/cli/sample.py (--help for every flag).
"""

import sys

from sgm_jax.cli.sample import build_parser, main  # noqa: F401  (importable, as before)

if __name__ == "__main__":
    sys.exit(main())
