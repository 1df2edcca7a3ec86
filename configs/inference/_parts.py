"""Building blocks shared by the inference configs (the seed's configs/inference/*.yaml).

Every dict mirrors the seed's yaml 1:1 (`target` + `params`), so a reader can diff them.
Keys the seed's PyTorch code needs but sgm_jax ignores are kept for fidelity:
`use_checkpoint`, `spatial_transformer_attn_type`,
`monitor`, `lossconfig`, `attn_type: vanilla-xformers` (all attention is plain softmax here).
"""

from __future__ import annotations

from typing import Any

from sgm_jax.sampling_defaults import SamplingDefaults

SEED = "sgm.modules.diffusionmodules"
ENCODERS = "sgm.modules.encoders.modules"


def discrete_denoiser(scaling: str = "EpsScaling") -> dict[str, Any]:
    """DiscreteDenoiser over LegacyDDPMDiscretization's 1000 sigmas (SDXL and SD 2.x)."""
    return {"target": f"{SEED}.denoiser.DiscreteDenoiser", "params": {
        "num_idx": 1000,
        "scaling_config": {"target": f"{SEED}.denoiser_scaling.{scaling}"},
        "discretization_config": {"target": f"{SEED}.discretizer.LegacyDDPMDiscretization"}}}


def unet(**params: Any) -> dict[str, Any]:
    # tuples, not lists: ml_collections can override tuples from the command line
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return {"target": f"{SEED}.openaimodel.UNetModel", "params": params}


def embedder(target: str, input_key: str, **params: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"is_trainable": False, "input_key": input_key, "target": f"{ENCODERS}.{target}"}
    if params:
        spec["params"] = params
    return spec


def size_embedder(input_key: str, outdim: int = 256) -> dict[str, Any]:
    """SDXL's micro-conditioning: each of the input's columns -> `outdim` Fourier features."""
    return embedder("ConcatTimestepEmbedderND", input_key, outdim=outdim)


def conditioner(*emb_models: dict[str, Any]) -> dict[str, Any]:
    return {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": list(emb_models)}}


def ddconfig(ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
             resolution: int = 256, **extra: Any) -> dict[str, Any]:
    cfg = {"double_z": True, "z_channels": 4, "resolution": resolution, "in_channels": 3, "out_ch": 3, "ch": ch,
           "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    cfg.update(extra)
    return cfg


def autoencoder_kl(dd: dict[str, Any], embed_dim: int = 4) -> dict[str, Any]:
    return {"target": "sgm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": embed_dim, "monitor": "val/rec_loss", "ddconfig": dd,
        "lossconfig": {"target": "torch.nn.Identity"}}}


def engine(network: dict, denoiser: dict, cond: dict, first_stage: dict, scale_factor: float,
           decode_n_at_a_time: int | None = None) -> dict[str, Any]:
    """The `model:` section of a seed inference yaml. decode_n_at_a_time: the seed's
    en_and_decode_n_samples_a_time (None: the whole batch in one call)."""
    return {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": scale_factor,
        "en_and_decode_n_samples_a_time": decode_n_at_a_time,
        "disable_first_stage_autocast": True,  # the inference pipeline runs the VAE in float32, as the seed
        "denoiser_config": denoiser,
        "network_config": network,
        "conditioner_config": cond,
        "first_stage_config": first_stage}}


# The seed demo's SD_XL_BASE_RATIOS (scripts/demo/sampling.py): (width, height), aspect 0.5 ... 3.0
SDXL_RESOLUTIONS = ((704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152),
                    (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
                    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704),
                    (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576))


# scripts/demo/turbo.py's sampling: SubstepSampler(n_sample_steps=1, num_steps=1000, eta=1.0) on the
# LegacyDDPM schedule, and no guidance (the seed's default IdentityGuider; its uc is the prompt itself)
TURBO = {"sampler": "SubstepSampler", "num_steps": 1, "discretization": "LegacyDDPMDiscretization",
         "guider": "IdentityGuider", "cfg_scale": 1.0}


def inference(width: int, height: int, tokenizers: list[str], **overrides: Any) -> dict[str, Any]:
    """Sampling defaults (sgm_jax.sampling_defaults.SamplingDefaults: the seed's
    scripts/demo/sampling.py values) at this size.

    `tokenizers`: for each text embedder, in order, the tokenizer sub-folder of a
    diffusers-style checkpoint folder ("tokenizer" = CLIP-L, "tokenizer_2" = OpenCLIP).
    All of them use the same CLIP BPE vocabulary; `tokenizer_path` None searches the usual
    places (see sgm_jax.nn.tokenizer.load_tokenizer).
    """
    return SamplingDefaults.from_section(dict(width=width, height=height, tokenizers=tokenizers, **overrides)).section()
