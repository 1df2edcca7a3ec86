"""Train a diffusion model: python train.py --config configs/mnist_cond.py [--config.a.b=v ...] [--workdir DIR]

Without --config, trains the embedded default: configs/mnist_cond_cpu.py (a 10-minute CPU budget).
The same command is installed as `sgm-train` and `python -m sgm_jax.train` (sgm_jax/cli/train.py).
"""

from sgm_jax.cli.train import main

if __name__ == "__main__":
    main()
