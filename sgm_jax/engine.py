"""DiffusionEngine: the seed's sgm.models.diffusion.DiffusionEngine as a frozen bundle of pure parts.

It holds no parameters. Parameters live in one tree, laid out like the seed's checkpoint:
`{"model": UNet params, "conditioner": {"embedders_<i>": ...}, "first_stage": VAE params}`
(`first_stage` only when the config has an AutoencoderKL / AutoencodingEngine; it is never trained here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax.batch_keys import MOMENTS_KEY, is_stored_output
from sgm_jax.diffusion.denoiser import Denoiser
from sgm_jax.diffusion.loss import StandardDiffusionLoss
from sgm_jax.diffusion.registry import instantiate_from_config, to_plain
from sgm_jax.nn.conditioner import GeneralConditioner, build_conditioner
from sgm_jax.nn.layers import in_chunks
from sgm_jax.nn.unet import UNetModel
from sgm_jax.nn.video_unet import VideoUNet
from sgm_jax.nn.vae import DiagonalGaussianDistribution, autoencoder_from_config

Params = Mapping[str, Any]
Cond = Mapping[str, jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# network_config targets by class name: sgm.modules.diffusionmodules.openaimodel.UNetModel,
# sgm.modules.diffusionmodules.video_model.VideoUNet (SVD).
NETWORKS: dict[str, type[UNetModel]] = {"UNetModel": UNetModel, "VideoUNet": VideoUNet, "": UNetModel}


def _target_name(cfg: Mapping[str, Any] | None) -> str:
    return str((cfg or {}).get("target", "")).rsplit(".", 1)[-1]


def resolve_dtype(name: str | Any) -> Any:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class DiffusionEngine:
    network: UNetModel
    denoiser: Denoiser
    conditioner: GeneralConditioner
    loss_fn: StandardDiffusionLoss | None = None
    sampler: Any = None
    first_stage: nn.Module | None = None
    scale_factor: float = 1.0
    input_key: str = "jpg"
    # the seed's en_and_decode_n_samples_a_time (SVD's decoding_t): the first stage encodes and
    # decodes this many images / frames per call (a VideoDecoder: each chunk is one clip); None: all
    en_and_decode_n_samples_a_time: int | None = None

    # --- networks ------------------------------------------------------------------------
    def network_fn(self, model_params: Params, deterministic: bool = True, dropout_key: jax.Array | None = None):
        """The seed's OpenAIWrapper: concat conditioning joins x on channels (NHWC: last axis)."""
        rngs = {"dropout": dropout_key} if dropout_key is not None else None

        def network(x: jax.Array, c_noise: jax.Array, cond: Cond) -> jax.Array:
            if "concat" in cond:
                x = jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)
            out = self.network.apply({"params": model_params}, x, c_noise, context=cond.get("crossattn"),
                                     y=cond.get("vector"), deterministic=deterministic, rngs=rngs,
                                     **video_inputs(cond))
            return out.astype(jnp.float32)

        return network

    def denoise(self, params: Params, x: jax.Array, sigma: jax.Array, cond: Cond) -> jax.Array:
        """x: [B, h, w, c] latents, sigma: [B] -> denoised latents."""
        return self.denoiser(self.network_fn(params["model"]), x, sigma, cond)

    def condition(self, params: Params, batch: Mapping[str, Any], ucg_key: jax.Array | None = None,
                  force_zero_embeddings: tuple[str, ...] = ()) -> dict[str, jax.Array]:
        return self.conditioner.apply({"params": params.get("conditioner", {})}, batch, ucg_key,
                                      tuple(force_zero_embeddings))

    def encode_first_stage(self, params: Params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, embed_dim] (float32).

        Without `key`: the posterior mode (deterministic). With `key`: a posterior sample, as
        the seed's AutoencoderKL (DiagonalGaussianRegularizer(sample=True)) draws one.
        """
        if self.first_stage is None:
            return x
        return self.latents_from_moments(self.posterior_moments(params, x), key)

    def posterior_moments(self, params: Params, x: jax.Array) -> jax.Array:
        """x: [B, H, W, 3] in [-1, 1] -> the first stage's moments [B, H/f, W/f, 2 * embed_dim]
        (mean, logvar: the encoder output before sampling; what pre-encoding stores)."""
        return in_chunks(lambda xs: self.first_stage.apply({"params": params["first_stage"]}, xs, method="encode"),
                         x, self.en_and_decode_n_samples_a_time)

    def latents_from_moments(self, moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """moments [B, h, w, 2 * embed_dim] -> scaled latents [B, h, w, embed_dim] (float32):
        the posterior mode, or with `key` a sample."""
        posterior = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments).astype(jnp.float32))
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.scale_factor * z

    def training_latents(self, params: Params, batch: Mapping[str, Any], key: jax.Array) -> jax.Array:
        """The batch's latents [B, h, w, c] for the loss: a posterior sample of the images, or of the
        stored moments of a pre-encoded batch (the same `key` draws the same sample from both)."""
        if MOMENTS_KEY in batch:
            if self.first_stage is None:
                raise ValueError(f"the batch holds '{MOMENTS_KEY}' but this model has no first stage")
            return self.latents_from_moments(batch[MOMENTS_KEY], key)
        return self.encode_first_stage(params, jnp.asarray(batch[self.input_key]), key)

    def raw_stand_in(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A pre-encoded batch -> the raw layout for shapes (init, abstract params): zero images of
        the encoded size [B, H, W, in_channels] instead of moments, stored embeddings left out so
        every embedder initialises. Raw batches are returned unchanged."""
        if MOMENTS_KEY not in batch:
            return dict(batch)
        b, h, w, _ = jnp.shape(batch[MOMENTS_KEY])
        f = self.first_stage_factor
        out = {k: v for k, v in batch.items() if not is_stored_output(k)}
        out[self.input_key] = jnp.zeros((b, h * f, w * f, int(self.first_stage.ddconfig["in_channels"])))
        return out

    def decode_first_stage(self, params: Params, z: jax.Array) -> jax.Array:
        """z: [B, h, w, embed_dim] scaled latents -> images [B, h*f, w*f, 3], roughly in [-1, 1] (float32).
        A VideoDecoder decodes each chunk of en_and_decode_n_samples_a_time frames as one clip."""
        if self.first_stage is None:
            return z
        x = in_chunks(lambda zs: self.first_stage.apply({"params": params["first_stage"]}, zs, method="decode"),
                      z / self.scale_factor, self.en_and_decode_n_samples_a_time)
        return x.astype(jnp.float32)

    # --- training ------------------------------------------------------------------------
    def loss(self, params: Params, batch: Mapping[str, Any], key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean loss over the batch and the per-example losses [B] (float32)."""
        if self.loss_fn is None:
            raise ValueError("this engine has no loss_fn_config: it can sample but not train")
        ucg_key, loss_key, dropout_key, posterior_key = jax.random.split(key, 4)
        # the seed's first stage samples its posterior in training (DiagonalGaussianRegularizer(sample=True))
        x = jax.lax.stop_gradient(self.training_latents(params, batch, posterior_key))
        cond = self.condition(params, batch, ucg_key)

        def denoise_fn(model_params, noised, sigmas, cond_):
            network = self.network_fn(model_params, deterministic=False, dropout_key=dropout_key)
            return self.denoiser(network, noised, sigmas, cond_)

        per_example = self.loss_fn(denoise_fn, params["model"], x, cond, loss_key)
        return per_example.mean(), per_example

    def init_params(self, key: jax.Array, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Random params for the trainable parts ("model", "conditioner") from an example batch."""
        cond_key, model_key = jax.random.split(key)
        batch = self.raw_stand_in(batch)
        cond_params = self.conditioner.init(cond_key, batch).get("params", {})
        cond = self.conditioner.apply({"params": cond_params}, batch)
        x = jnp.asarray(batch[self.input_key])[:1]
        if self.first_stage is not None:
            x = jnp.zeros(self.latent_shape(x.shape), jnp.float32)
        if "concat" in cond:
            x = jnp.concatenate([x, cond["concat"][:1].astype(x.dtype)], axis=-1)
        video = {"image_only_indicator": jnp.zeros((1, 1))} if isinstance(self.network, VideoUNet) else {}
        model_params = self.network.init(model_key, x, jnp.zeros((1,)), context=_first(cond.get("crossattn")),
                                         y=_first(cond.get("vector")), **video)["params"]
        return {"model": model_params, "conditioner": cond_params}

    @property
    def first_stage_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (encoder levels - 1); 1 without a first stage."""
        return 1 if self.first_stage is None else 2 ** (len(self.first_stage.ddconfig["ch_mult"]) - 1)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """[B, H, W, 3] image shape -> the shape the diffusion model works on."""
        if self.first_stage is None:
            return tuple(image_shape)
        b, h, w, _ = image_shape
        f = self.first_stage_factor
        return (b, h // f, w // f, int(self.first_stage.embed_dim))

    # --- sampling ------------------------------------------------------------------------
    def sample(self, params: Params, cond: Cond, uc: Cond | None, noise: jax.Array,
               key: jax.Array | None = None, sampler: Any = None) -> jax.Array:
        """noise: [B, h, w, c] unit Gaussian -> samples in data space (decoded when a VAE is set)."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("no sampler: pass sampler=... or set model.sampler_config")
        z = sampler(lambda x, s, c: self.denoise(params, x, s, c), noise, cond, uc=uc, key=key)
        return self.decode_first_stage(params, z)


def video_inputs(cond: Cond) -> dict[str, jax.Array]:
    """The seed's additional_model_inputs that reach a VideoUNet: image_only_indicator [B, T]
    (the frames per video T from its shape; the guiders double it with the batch)."""
    return {"image_only_indicator": cond["image_only_indicator"]} if "image_only_indicator" in cond else {}


def _first(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else x[:1]


def build_engine(model_config: Mapping[str, Any], dtype: Any = "float32") -> DiffusionEngine:
    """DiffusionEngine from the seed's `model.params` (a ConfigDict or dict in yaml layout)."""
    cfg = to_plain(model_config)
    cfg = cfg.get("params", cfg)
    compute_dtype = resolve_dtype(dtype)
    network_cfg = cfg["network_config"]
    network_cls = NETWORKS.get(_target_name(network_cfg))
    if network_cls is None:
        raise ValueError(f"unsupported network target {network_cfg['target']!r}; sgm_jax implements "
                         f"{', '.join(n for n in NETWORKS if n)}")
    network = network_cls(**network_cfg.get("params", {}), dtype=compute_dtype)
    first_stage = None
    fs_cfg = cfg.get("first_stage_config")
    if fs_cfg is not None and _target_name(fs_cfg) not in ("IdentityFirstStage", ""):
        first_stage = autoencoder_from_config(fs_cfg, dtype=compute_dtype)
    emb_models = (cfg.get("conditioner_config") or {}).get("params", {}).get("emb_models", [])
    return DiffusionEngine(
        network=network,
        denoiser=instantiate_from_config(cfg["denoiser_config"]),
        conditioner=build_conditioner(emb_models),
        loss_fn=instantiate_from_config(cfg["loss_fn_config"]) if cfg.get("loss_fn_config") else None,
        sampler=instantiate_from_config(cfg["sampler_config"]) if cfg.get("sampler_config") else None,
        first_stage=first_stage,
        scale_factor=float(cfg.get("scale_factor", 1.0)),
        input_key=cfg.get("input_key", "jpg"),
        en_and_decode_n_samples_a_time=cfg.get("en_and_decode_n_samples_a_time"),
    )
