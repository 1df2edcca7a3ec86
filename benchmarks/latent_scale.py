"""A latent model's `scale_factor` for a trained first stage: 1 / std of the posterior means of
real images (how SD's 0.18215 and SDXL's 0.13025 were chosen), e.g. for configs/mnist_txt2img.py.

    python benchmarks/latent_scale.py workdir/autoencoder_mnist --pad 2 --num 2048
"""

from __future__ import annotations

import argparse

import jax
import numpy as np


def main() -> None:
    from sgm_jax.checkpointing.workdirs import load_first_stage
    from sgm_jax.data import MnistDataset
    from sgm_jax.nn.vae import DiagonalGaussianDistribution, autoencoder_from_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first_stage", help="autoencoder workdir or converted directory")
    p.add_argument("--num", type=int, default=2048, help="training digits to encode")
    p.add_argument("--pad", type=int, default=2, help="pixels of background around each 28x28 digit")
    p.add_argument("--data", default=None, help="MNIST IDX folder (default: the usual places)")
    args = p.parse_args()

    config, params = load_first_stage(args.first_stage)
    model = autoencoder_from_config(config)
    digits = MnistDataset(args.data, split="train").example_batch(args.num)["jpg"]
    x = np.pad(digits, ((0, 0), (args.pad, args.pad), (args.pad, args.pad), (0, 0)), constant_values=-1.0)
    encode = jax.jit(lambda b: DiagonalGaussianDistribution.from_moments(
        model.apply({"params": params}, b, method="encode")).mode())
    z = np.concatenate([np.asarray(encode(x[i:i + 256])) for i in range(0, len(x), 256)])
    print(f"latents {z.shape}: mean {z.mean():.4f}, std {z.std():.4f} -> scale_factor {1.0 / z.std():.4f}")


if __name__ == "__main__":
    main()
