"""Train a diffusion model: python train.py --config configs/mnist_cond.py [--config.a.b=v ...] [--workdir DIR]

Without --config, trains the embedded default: configs/mnist_cond_cpu.py (a 10-minute CPU budget).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # configs/ import each other as a package

DEFAULT_CONFIG = str(REPO / "configs" / "mnist_cond_cpu.py")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file (ml_collections get_config())",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples and the resolved config go here "
                    "(default: workdir/<config name>)")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from sgm_jax.training.loop import train  # after flag parsing: --help stays fast

    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or str(Path("workdir") / config.training.get("name", "run"))
    train(config, workdir)


if __name__ == "__main__":
    app.run(main)
