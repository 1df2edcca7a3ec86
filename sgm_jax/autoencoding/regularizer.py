"""The seed's DiagonalGaussianRegularizer (sgm/modules/autoencoding/regularizers/__init__.py):
encoder moments -> latent (a posterior sample, or its mode with `sample: False`) and the log
`{"kl_loss": sum(KL(q || N(0, I))) / B}` that `regularization_weights` weighs in the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgm_jax.nn.vae import DiagonalGaussianDistribution


def diagonal_gaussian_regularizer(moments: jax.Array, key: jax.Array | None
                                  ) -> tuple[jax.Array, dict[str, jax.Array], DiagonalGaussianDistribution]:
    """moments `[B, h, w, 2C]` -> (z `[B, h, w, C]`, {"kl_loss": scalar}, posterior); z is the
    posterior's mode when `key` is None (the seed's `sample=False`), else a sample."""
    posterior = DiagonalGaussianDistribution.from_moments(moments)
    z = posterior.mode() if key is None else posterior.sample(key)
    return z, {"kl_loss": jnp.sum(posterior.kl()) / moments.shape[0]}, posterior
