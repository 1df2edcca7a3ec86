"""`python -m sgm_jax.train --config mnist_cond_cpu [--config.a.b=v ...] [--workdir DIR]` (see sgm_jax.cli.train)."""

from sgm_jax.cli.train import main

if __name__ == "__main__":
    main()
