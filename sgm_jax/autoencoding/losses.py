"""The seed's GeneralLPIPSWithDiscriminator as pure functions over arrays and params.

Mirrors `sgm/modules/autoencoding/losses/discriminator_loss.py` and `lpips/vqperceptual.py`:

  rec       = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)             [B, H, W, C]
  nll       = sum(rec / exp(logvar) + logvar) / B                          (logvar learned or fixed)
  g         = -mean(D(x_rec))                                               (from disc_start on)
  d_weight  = clamp(||d nll / d W|| / (||d g / d W|| + 1e-4), 0, 1e4) * disc_weight,
              W = the decoder's last layer (conv_out kernel), detached
  loss_ae   = nll + d_weight * disc_factor * g + sum_k regularization_weights[k] * reg_log[k]
  loss_disc = disc_factor * {hinge | vanilla}(D(x), D(x_rec.detach()))     (from disc_start on)

Before `disc_start` the generator term and d_weight are 0 and the discriminator is not updated
(the seed's zero d_loss leaves its parameters without gradients, so Adam skips them).
`autoencoder_objective` returns the cotangent of loss_ae with respect to x_rec, so the
autoencoder's backward pass runs once (see task.py); `last_layer_grad` maps a cotangent at
x_rec to the gradient at W, which is all the adaptive weight needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from sgm_jax.autoencoding.discriminator import NLayerDiscriminator

Params = Any


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """GeneralLPIPSWithDiscriminator's arguments (the seed's names and defaults)."""

    disc_start: int
    logvar_init: float = 0.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_loss: str = "hinge"
    learn_logvar: bool = False
    regularization_weights: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "LossConfig":
        p = dict(params)
        for name, default in (("scale_input_to_tgt_size", False), ("dims", 2)):
            if p.pop(name, default) != default:
                raise ValueError(f"loss_config.params.{name} is not supported (images only, same size)")
        p.pop("discriminator_config", None)  # built by discriminator_from_config
        p.pop("additional_log_keys", None)  # every regularization term is logged anyway
        if p.get("disc_loss", "hinge") not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {p['disc_loss']!r}")
        p["regularization_weights"] = tuple(sorted((str(k), float(v)) for k, v in
                                                   dict(p.get("regularization_weights") or {}).items()))
        unknown = set(p) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GeneralLPIPSWithDiscriminator parameters: {sorted(unknown)}")
        return cls(**p)


def nll_losses(rec_loss: jax.Array, logvar: jax.Array) -> jax.Array:
    """The seed's get_nll_loss (weights=None): sum(rec / exp(logvar) + logvar) / B."""
    nll = rec_loss / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec_loss.shape[0]


def reconstruction_loss(cfg: LossConfig, inputs: jax.Array, reconstructions: jax.Array,
                        perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None) -> jax.Array:
    """|x - x_rec| (+ perceptual_weight * LPIPS per example, broadcast): `[B, H, W, C]`."""
    rec = jnp.abs(inputs - reconstructions)
    if cfg.perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("perceptual_weight > 0 needs the LPIPS network")
        rec = rec + cfg.perceptual_weight * perceptual(inputs, reconstructions)[:, None, None, None]
    return rec


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """||dNLL/dW|| / (||dG/dW|| + 1e-4), clamped to [0, 1e4], times disc_weight (no gradient)."""
    w = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


def discriminator_apply(disc: NLayerDiscriminator, disc_vars: Mapping[str, Any], x: jax.Array
                        ) -> tuple[jax.Array, Any]:
    """Logits in training mode (batch statistics) and the updated batch_stats."""
    logits, updates = disc.apply(dict(disc_vars), x, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def autoencoder_objective(cfg: LossConfig, disc: NLayerDiscriminator, inputs: jax.Array, reconstructions: jax.Array,
                          logvar: jax.Array, disc_vars: Mapping[str, Any], reg_log: Mapping[str, jax.Array],
                          last_layer_grad: Callable[[jax.Array], jax.Array], disc_active: jax.Array,
                          perceptual: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                          ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], Any]:
    """Optimizer index 0 (the autoencoder's update).

    Returns (cotangent of loss_ae at `reconstructions` `[B, H, W, C]`, d loss_ae / d logvar,
    log, discriminator batch_stats after the generator's forward). The regularization terms'
    own gradients (e.g. the KL's, with weight w_k) are the caller's: they flow through the
    encoder only. `disc_active`: bool scalar, global_step >= disc_start.
    """

    def nll_of(rec_images, lv):
        rec = reconstruction_loss(cfg, inputs, rec_images, perceptual)
        return nll_losses(rec, lv), rec

    (nll, rec), (nll_ct, logvar_grad) = jax.value_and_grad(nll_of, argnums=(0, 1), has_aux=True)(
        reconstructions, logvar)

    def with_gan(_):
        def g_of(rec_images):
            logits, stats = discriminator_apply(disc, disc_vars, rec_images)
            return -jnp.mean(logits), stats

        (g, stats), g_ct = jax.value_and_grad(g_of, has_aux=True)(reconstructions)
        d_weight = adaptive_weight(last_layer_grad(nll_ct), last_layer_grad(g_ct), cfg.disc_weight)
        return g, g_ct, d_weight, stats

    def without_gan(_):
        return (jnp.zeros((), jnp.float32), jnp.zeros_like(reconstructions), jnp.zeros((), jnp.float32),
                disc_vars["batch_stats"])

    g, g_ct, d_weight, stats = jax.lax.cond(disc_active, with_gan, without_gan, None)
    loss = nll + d_weight * cfg.disc_factor * g
    log = {}
    for name, weight in cfg.regularization_weights:
        if name in reg_log:
            loss = loss + weight * reg_log[name]
    log.update({name: value for name, value in reg_log.items()})
    log.update({"loss/total": loss, "loss/nll": nll, "loss/rec": jnp.mean(rec), "loss/g": g,
                "scalars/logvar": logvar, "scalars/d_weight": d_weight})
    cotangent = nll_ct + (d_weight * cfg.disc_factor) * g_ct
    return cotangent, logvar_grad, log, stats


def discriminator_loss(cfg: LossConfig, disc: NLayerDiscriminator, disc_params: Params, batch_stats: Any,
                       inputs: jax.Array, reconstructions: jax.Array) -> tuple[jax.Array, tuple[dict, Any]]:
    """Optimizer index 1 (after disc_start): disc_factor * d_loss(D(x), D(x_rec)), with the
    batch statistics of each call, as the seed runs real and fake through D separately.
    Returns (loss, (log, batch_stats)); differentiate with respect to `disc_params`."""
    logits_real, stats = discriminator_apply(disc, {"params": disc_params, "batch_stats": batch_stats}, inputs)
    logits_fake, stats = discriminator_apply(disc, {"params": disc_params, "batch_stats": stats},
                                             jax.lax.stop_gradient(reconstructions))
    d_loss = cfg.disc_factor * D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    log = {"loss/disc": d_loss, "logits/real": jnp.mean(logits_real), "logits/fake": jnp.mean(logits_fake)}
    return d_loss, (log, stats)
