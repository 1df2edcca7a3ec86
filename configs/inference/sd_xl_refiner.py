"""The seed's configs/inference/sd_xl_refiner.yaml: SDXL 1.0 refiner (OpenCLIP-G only,
aesthetic-score conditioning), used as img2img on the base model's latents."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P


def model() -> dict:
    network = P.unet(
        adm_in_channels=2560,  # 1280 (OpenCLIP-G pooled) + 5 * 256 (size, crop, aesthetic score)
        num_classes="sequential",
        use_checkpoint=True,
        in_channels=4,
        out_channels=4,
        model_channels=384,
        attention_resolutions=[4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=4,
        context_dim=[1280, 1280, 1280, 1280],
        spatial_transformer_attn_type="softmax-xformers",
    )
    cond = P.conditioner(
        P.embedder("FrozenOpenCLIPEmbedder2", "txt", arch="ViT-bigG-14", version="laion2b_s39b_b160k",
                   legacy=False, freeze=True, layer="penultimate", always_return_pooled=True),
        P.size_embedder("original_size_as_tuple"),
        P.size_embedder("crop_coords_top_left"),
        P.size_embedder("aesthetic_score"),
    )
    first_stage = P.autoencoder_kl(P.ddconfig(attn_type="vanilla-xformers"))
    return P.engine(network, P.discrete_denoiser("EpsScaling"), cond, first_stage, scale_factor=0.13025,
                    # one image at a time through the VAE: a batched 1024² decode holds ~6.5 GiB of
                    # temporaries per image (26 GiB for 4 on one 16 GiB v5e chip; one at a time: 4.3)
                    decode_n_at_a_time=1)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    # scripts/demo/sampling.py: refinement strength 0.15, aesthetic 6.0 / negative 2.5.
    config.inference = P.inference(1024, 1024, ["tokenizer_2"], crop_coords_top_left=[0, 0],
                                   refiner_strength=0.15, resolutions=P.SDXL_RESOLUTIONS,
                                   aesthetic_score=6.0, negative_aesthetic_score=2.5)
    return config
