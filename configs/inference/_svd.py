"""Stable Video Diffusion's model section (the seed's configs/inference/svd.yaml and
scripts/sampling/configs/svd*.yaml), built at any width: the released SVD / SVD-XT and the tiny
CPU stand-in share this code and its checkpoint layout."""

from __future__ import annotations

from typing import Any

from sgm_jax.configs.inference import _parts as P

SVD_UNET = dict(adm_in_channels=768, num_classes="sequential", use_checkpoint=True, in_channels=8, out_channels=4,
                model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                num_head_channels=64, use_linear_in_transformer=True, transformer_depth=1, context_dim=1024,
                spatial_transformer_attn_type="softmax-xformers", extra_ff_mix_layer=True, use_spatial_context=True,
                merge_strategy="learned_with_images", video_kernel_size=(3, 1, 1))
VAE_DD = dict(attn_type="vanilla", double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def conditioner(tower: dict[str, Any] | None = None, outdim: int = 256, encoder_dd: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """svd.yaml's five embedders; `tower` (CLIPVisionTower fields) None: OpenCLIP ViT-H-14."""
    clip_params: dict[str, Any] = {"freeze": True}
    if tower is not None:
        clip_params["tower"] = tower
    clip = {"target": f"{P.ENCODERS}.FrozenOpenCLIPImageEmbedder", "params": clip_params}
    encoder = {"target": "sgm.models.autoencoder.AutoencoderKLModeOnly", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {**VAE_DD, "attn_type": "vanilla-xformers",
                                                                **(encoder_dd or {})},
        "lossconfig": {"target": "torch.nn.Identity"}}}
    return P.conditioner(
        P.embedder("FrozenOpenCLIPImagePredictionEmbedder", "cond_frames_without_noise", n_cond_frames=1,
                   n_copies=1, open_clip_embedding_config=clip),
        P.size_embedder("fps_id", outdim),
        P.size_embedder("motion_bucket_id", outdim),
        P.embedder("VideoPredictionEmbedderWithEncoder", "cond_frames", disable_encoder_autocast=True,
                   n_cond_frames=1, n_copies=1, is_ae=True, encoder_config=encoder),
        P.size_embedder("cond_aug", outdim),
    )


def first_stage(image_decoder: bool = False, dd: dict[str, Any] | None = None) -> dict[str, Any]:
    """The VideoDecoder first stage (svd / svd_xt: an AutoencodingEngine, no quant convs), or the
    per-frame image decoder of svd*_image_decoder.yaml (the seed's AutoencoderKL, with quant convs)."""
    dd = {**VAE_DD, **(dd or {})}
    if image_decoder:
        return {"target": "sgm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {**dd, "attn_type": "vanilla-xformers"},
            "lossconfig": {"target": "torch.nn.Identity"}}}
    return {"target": "sgm.models.autoencoder.AutoencodingEngine", "params": {
        "loss_config": {"target": "torch.nn.Identity"},
        "regularizer_config": {"target": "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer"},
        "encoder_config": {"target": "sgm.modules.diffusionmodules.model.Encoder", "params": dd},
        "decoder_config": {"target": "sgm.modules.autoencoding.temporal_ae.VideoDecoder",
                           "params": {**dd, "video_kernel_size": [3, 1, 1]}}}}


def model(num_frames: int, max_scale: float, min_scale: float, num_steps: int, *, unet: dict[str, Any] | None = None,
          cond: dict[str, Any] | None = None, vae: dict[str, Any] | None = None) -> dict[str, Any]:
    network = {"target": f"{P.SEED}.video_model.VideoUNet",
               "params": {k: tuple(v) if isinstance(v, list) else v for k, v in {**SVD_UNET, **(unet or {})}.items()}}
    denoiser = {"target": f"{P.SEED}.denoiser.Denoiser",
                "params": {"scaling_config": {"target": f"{P.SEED}.denoiser_scaling.VScalingWithEDMcNoise"}}}
    out = P.engine(network, denoiser, cond or conditioner(), vae or first_stage(), scale_factor=0.18215)
    out["params"]["sampler_config"] = {"target": f"{P.SEED}.sampling.EulerEDMSampler", "params": {
        "num_steps": num_steps,
        "discretization_config": {"target": f"{P.SEED}.discretizer.EDMDiscretization", "params": {"sigma_max": 700.0}},
        "guider_config": {"target": f"{P.SEED}.guiders.LinearPredictionGuider",
                          "params": {"max_scale": max_scale, "min_scale": min_scale, "num_frames": num_frames}}}}
    return out


def inference(width: int, height: int, num_frames: int, num_steps: int, max_scale: float, min_scale: float,
              **overrides: Any) -> dict[str, Any]:
    """simple_video_sample.py's defaults: the model's EDM schedule and per-frame guider."""
    return P.inference(width, height, [], num_steps=num_steps, sampler="EulerEDMSampler", discretization="config",
                       guider="LinearPredictionGuider", cfg_scale=max_scale, num_frames=num_frames,
                       guider_options={"min_scale": min_scale, "num_frames": num_frames},
                       **{"decoding_t": 14, **overrides})
