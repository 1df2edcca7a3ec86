"""The sampling demo (a web app): python demo.py --model workdir/mnist_cond_cpu [--model checkpoints/sd_xl_base]

Installed as `sgm-demo`; the app lives in sgm_jax/cli/demo.py (--help for the flags).
"""

import sys

from sgm_jax.cli.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
