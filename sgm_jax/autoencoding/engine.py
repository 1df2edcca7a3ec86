"""The AutoencodingEngine's training pieces built from a config: networks, optimisers, state.

`model.target` is the seed's AutoencodingEngine (encoder_config / decoder_config, no quant
convs) or AutoencoderKL (embed_dim / ddconfig, with quant convs); `model.params.loss_config`
is GeneralLPIPSWithDiscriminator's. Learning rates as the seed's configure_optimizers:
autoencoder `lr_g_factor * base_learning_rate`, discriminator `base_learning_rate`, both with
`optimizer_config` (default torch.optim.Adam: betas (0.9, 0.999), eps 1e-8, no weight decay).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sgm_jax.autoencoding.discriminator import NLayerDiscriminator, discriminator_from_config
from sgm_jax.autoencoding.losses import LossConfig
from sgm_jax.diffusion.registry import to_plain
from sgm_jax.nn.vae import AutoencoderKL, autoencoder_from_config
from sgm_jax.optim import seed_optimizer

Params = Any


@flax.struct.dataclass
class AutoencoderState:
    """What a checkpoint holds. `params`: {"autoencoder": ..., "logvar": scalar (only when
    learn_logvar)}; `ema_params`: EMA of params["autoencoder"] when model.params.ema_decay."""

    step: jax.Array
    params: Params
    opt_state: Any
    disc_params: Params
    disc_batch_stats: Any
    disc_opt_state: Any
    ema_params: Params = None


@dataclasses.dataclass(frozen=True)
class AutoencoderParts:
    """Everything static the train step needs, built once from the config."""

    model: AutoencoderKL
    discriminator: NLayerDiscriminator
    loss: LossConfig
    ae_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    sample_posterior: bool
    disc_start_iter: int
    ema_decay: float | None
    input_key: str
    optimizer_order: str  # "sequential" | "alternate"

    @property
    def tanh_out(self) -> bool:
        return bool((self.model.decoder_config or self.model.ddconfig).get("tanh_out", False))


def build_parts(config: Any) -> AutoencoderParts:
    """AutoencoderParts from a full config (`model`, `training`)."""
    model_cfg = to_plain(config.model)
    mp = dict(model_cfg.get("params", {}))
    target = str(model_cfg["target"]).rsplit(".", 1)[-1]
    if target not in ("AutoencodingEngine", "AutoencoderKL", "AutoencodingEngineLegacy"):
        raise ValueError(f"model.target {model_cfg['target']!r} is not an autoencoder sgm_jax trains")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[str(config.training.dtype)]
    model = autoencoder_from_config(model_cfg, dtype=dtype)
    if model.decoder_target != "Decoder":  # the adaptive GAN weight takes conv_out as the last layer
        raise ValueError(f"training a {model.decoder_target} first stage is not implemented (SVD's is inference-only)")
    loss_cfg = mp.get("loss_config") or mp.get("lossconfig")
    if not loss_cfg or not str(loss_cfg.get("target", "")).endswith("GeneralLPIPSWithDiscriminator"):
        raise ValueError("model.params.loss_config must be GeneralLPIPSWithDiscriminator to train an autoencoder")
    loss_params = dict(loss_cfg.get("params", {}))
    reg = dict(mp.get("regularizer_config") or {})
    if "AutoencoderKLModeOnly" in str(model_cfg["target"]):
        reg.setdefault("params", {})["sample"] = False
    for name in ("trainable_ae_params", "trainable_disc_params", "ae_optimizer_args", "disc_optimizer_args",
                 "additional_decode_keys"):
        if mp.get(name):
            raise ValueError(f"model.params.{name} (per-group parameter selection) is not supported")
    lr = float(model_cfg["base_learning_rate"])
    lr_g = lr * float(mp.get("lr_g_factor", 1.0))
    ema = mp.get("ema_decay")
    optimizer_config = mp.get("optimizer_config") or {"target": "torch.optim.Adam"}  # the AutoencodingEngine's default
    order = str(config.training.optimizer_order)
    if order not in ("sequential", "alternate"):
        raise ValueError(f"training.optimizer_order must be 'sequential' or 'alternate', got {order!r}")
    return AutoencoderParts(
        model=model, discriminator=discriminator_from_config(loss_params), loss=LossConfig.from_params(loss_params),
        ae_tx=seed_optimizer(optimizer_config, lr_g), disc_tx=seed_optimizer(optimizer_config, lr),
        sample_posterior=bool((reg.get("params") or {}).get("sample", True)),
        disc_start_iter=int(mp.get("disc_start_iter", 0)), ema_decay=None if ema is None else float(ema),
        input_key=str(mp.get("input_key", "jpg")), optimizer_order=order)


def init_state(parts: AutoencoderParts, key: jax.Array, images: jax.Array) -> AutoencoderState:
    """Fresh state for images `[B, H, W, C]` (the network's input shape)."""
    ae_key, disc_key = jax.random.split(key)
    ae_params = parts.model.init(ae_key, images)["params"]
    disc_vars = parts.discriminator.init(disc_key, images, train=True)
    params = {"autoencoder": ae_params}
    if parts.loss.learn_logvar:
        params["logvar"] = jnp.full((), parts.loss.logvar_init, jnp.float32)
    return AutoencoderState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=parts.ae_tx.init(params),
        disc_params=disc_vars["params"], disc_batch_stats=disc_vars["batch_stats"],
        disc_opt_state=parts.disc_tx.init(disc_vars["params"]),
        ema_params=jax.tree_util.tree_map(jnp.copy, ae_params) if parts.ema_decay is not None else None)


def logvar_of(parts: AutoencoderParts, params: Params) -> jax.Array:
    return params["logvar"] if "logvar" in params else jnp.full((), parts.loss.logvar_init, jnp.float32)
