"""One jit-compilable training step of the AutoencodingEngine: autoencoder, then discriminator.

Orders (`training.optimizer_order`):
  "sequential": every batch updates the autoencoder (optimizer index 0) and then, from
      disc_start on, the discriminator (index 1) on reconstructions recomputed with the updated
      autoencoder and a fresh posterior sample: Lightning's loop over two optimizers, as the
      LDM / taming AutoencoderKL trained.
  "alternate": the seed's AutoencodingEngine.training_step under PyTorch 2: one optimizer per
      batch, index = step % 2 (the seed uses Lightning's per-epoch batch_idx), and only index 0
      before disc_start_iter.
The EMA of the autoencoder (model.params.ema_decay, LitEma's warm-up) follows every step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgm_jax.autoencoding.engine import AutoencoderParts, AutoencoderState, logvar_of
from sgm_jax.autoencoding.losses import autoencoder_objective, discriminator_loss
from sgm_jax.autoencoding.regularizer import diagonal_gaussian_regularizer
from sgm_jax.nn.vae import AutoencoderKL
from sgm_jax.optim import ema_decay, ema_update

Perceptual = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def _reconstruct(module: AutoencoderKL, x: jax.Array, key: jax.Array | None):
    z, reg_log, posterior = diagonal_gaussian_regularizer(module.encode(x), key)
    return module.decode(z), reg_log, posterior


def reconstruct(parts: AutoencoderParts, ae_params: Any, x: jax.Array, key: jax.Array | None = None):
    """(x_rec `[B, H, W, C]` float32, posterior); the posterior's mode when `key` is None."""
    rec, _, posterior = parts.model.apply({"params": ae_params}, x, key, method=_reconstruct)
    return rec.astype(jnp.float32), posterior


def _forward_with_last_input(parts: AutoencoderParts, ae_params: Any, x: jax.Array, key: jax.Array | None):
    """(x_rec, regularization log), conv_out's input (for the adaptive weight)."""
    (rec, reg_log, _), state = parts.model.apply({"params": ae_params}, x, key, method=_reconstruct,
                                                 mutable=["intermediates"])
    return (rec.astype(jnp.float32), reg_log), state["intermediates"]["decoder"]["conv_out_input"][0]


def last_layer_grad_fn(parts: AutoencoderParts, conv_out: Mapping[str, jax.Array], last_input: jax.Array):
    """cotangent at x_rec -> gradient at the decoder's conv_out kernel (its get_last_layer)."""
    out_ch = conv_out["kernel"].shape[-1]
    conv = nn.Conv(out_ch, (3, 3), padding=((1, 1), (1, 1)), dtype=parts.model.dtype)

    def last_layer(kernel):
        out = conv.apply({"params": {"kernel": kernel, "bias": conv_out["bias"]}}, last_input).astype(jnp.float32)
        return jnp.tanh(out) if parts.tanh_out else out

    _, vjp = jax.vjp(last_layer, conv_out["kernel"])
    return lambda cotangent: vjp(cotangent)[0]


def autoencoder_grads(parts: AutoencoderParts, state: AutoencoderState, x: jax.Array, key: jax.Array,
                      perceptual: Perceptual | None) -> tuple[dict[str, Any], dict[str, jax.Array], Any]:
    """Optimizer index 0's gradients (one backward pass through the autoencoder with the total
    cotangent), its log, and the discriminator's batch_stats after the generator's forward."""
    sample_key, dropout_key = jax.random.split(key)
    ae_params = state.params["autoencoder"]
    (rec, reg_log), vjp_fn, last_input = jax.vjp(
        lambda p: _forward_with_last_input(parts, p, x, sample_key if parts.sample_posterior else None),
        ae_params, has_aux=True)
    lpips = None if perceptual is None else (lambda a, b: perceptual(a, b, dropout_key))
    disc_active = state.step >= parts.loss.disc_start
    cotangent, logvar_grad, log, stats = autoencoder_objective(
        parts.loss, parts.discriminator, x, rec, logvar_of(parts, state.params),
        {"params": state.disc_params, "batch_stats": state.disc_batch_stats}, reg_log,
        last_layer_grad_fn(parts, ae_params["decoder"]["conv_out"], last_input), disc_active, lpips)
    weights = dict(parts.loss.regularization_weights)  # each term's own gradient: through the encoder only
    reg_cotangent = {k: jnp.asarray(weights.get(k, 0.0), v.dtype) for k, v in reg_log.items()}
    grads = {"autoencoder": vjp_fn((cotangent, reg_cotangent))[0]}
    if "logvar" in state.params:
        grads["logvar"] = logvar_grad
    return grads, log, stats


def autoencoder_update(parts: AutoencoderParts, state: AutoencoderState, x: jax.Array, key: jax.Array,
                       perceptual: Perceptual | None) -> tuple[AutoencoderState, dict[str, jax.Array]]:
    """Optimizer index 0: the autoencoder's (and learned logvar's) Adam step."""
    grads, log, stats = autoencoder_grads(parts, state, x, key, perceptual)
    updates, opt_state = parts.ae_tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": log["loss/total"], "grad_norm": optax.global_norm(grads), **log}
    return state.replace(params=params, opt_state=opt_state, disc_batch_stats=stats), metrics


def discriminator_update(parts: AutoencoderParts, state: AutoencoderState, x: jax.Array, key: jax.Array
                         ) -> tuple[AutoencoderState, dict[str, jax.Array]]:
    """Optimizer index 1, from disc_start on: reconstructions of the current autoencoder."""
    rec, _ = reconstruct(parts, state.params["autoencoder"], x, key if parts.sample_posterior else None)
    rec = jax.lax.stop_gradient(rec)
    (d_loss, (log, stats)), grads = jax.value_and_grad(
        lambda p: discriminator_loss(parts.loss, parts.discriminator, p, state.disc_batch_stats, x, rec),
        has_aux=True)(state.disc_params)
    updates, disc_opt_state = parts.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    new = state.replace(disc_params=optax.apply_updates(state.disc_params, updates), disc_opt_state=disc_opt_state,
                        disc_batch_stats=stats)
    return new, {**log, "disc_grad_norm": optax.global_norm(grads)}


_DISC_LOG = ("loss/disc", "logits/real", "logits/fake", "disc_grad_norm")


def _skip_disc(state: AutoencoderState) -> tuple[AutoencoderState, dict[str, jax.Array]]:
    return state, {k: jnp.zeros((), jnp.float32) for k in _DISC_LOG}


def make_train_step(parts: AutoencoderParts, perceptual: Perceptual | None = None):
    """`train_step(state, batch, key) -> (state, metrics)`; `key` already folded with the step;
    the batch's `input_key` images `[B, H, W, C]` in [-1, 1] (already padded to the model's size)."""

    def train_step(state: AutoencoderState, batch: Mapping[str, Any], key: jax.Array):
        x = jnp.asarray(batch[parts.input_key], jnp.float32)
        ae_key, disc_key = jax.random.split(key)
        disc_on = state.step >= parts.loss.disc_start
        if parts.optimizer_order == "sequential":
            state, metrics = autoencoder_update(parts, state, x, ae_key, perceptual)
            state, disc_metrics = jax.lax.cond(disc_on, lambda s: discriminator_update(parts, s, x, disc_key),
                                               _skip_disc, state)
            metrics = {**metrics, **disc_metrics, "optimizer_idx": jnp.zeros((), jnp.float32)}
        else:
            use_disc = (state.step >= parts.disc_start_iter) & (state.step % 2 == 1)

            def ae_branch(s):
                s, m = autoencoder_update(parts, s, x, ae_key, perceptual)
                return s, {**m, **_skip_disc(s)[1]}

            def disc_branch(s):
                ae_shapes = jax.eval_shape(lambda: autoencoder_update(parts, s, x, ae_key, perceptual)[1])
                s, m = jax.lax.cond(disc_on, lambda t: discriminator_update(parts, t, x, disc_key), _skip_disc, s)
                zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in ae_shapes.items()}
                return s, {**zeros, **m, "loss": m["loss/disc"], "grad_norm": m["disc_grad_norm"]}

            state, metrics = jax.lax.cond(use_disc, disc_branch, ae_branch, state)
            metrics = {**metrics, "optimizer_idx": use_disc.astype(jnp.float32)}
        if parts.ema_decay is not None:
            ema = ema_update(state.ema_params, state.params["autoencoder"], ema_decay(state.step + 1, parts.ema_decay))
            state = state.replace(ema_params=ema)
        return state.replace(step=state.step + 1), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train_step
