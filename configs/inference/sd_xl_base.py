"""The seed's configs/inference/sd_xl_base.yaml: SDXL 1.0 base (2.6 B UNet, CLIP-L + OpenCLIP-G).

    python convert_torch_weights.py --config configs/inference/sd_xl_base.py \
        --checkpoint sd_xl_base_1.0.safetensors --output checkpoints/sd_xl_base
"""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P


def model() -> dict:
    network = P.unet(
        adm_in_channels=2816,  # 1280 (OpenCLIP-G pooled) + 6 * 256 (size, crop, target size)
        num_classes="sequential",
        use_checkpoint=True,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 4],
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=[1, 2, 10],
        context_dim=2048,  # 768 (CLIP-L) + 1280 (OpenCLIP-G)
        spatial_transformer_attn_type="softmax-xformers",
    )
    cond = P.conditioner(
        P.embedder("FrozenCLIPEmbedder", "txt", layer="hidden", layer_idx=11),
        P.embedder("FrozenOpenCLIPEmbedder2", "txt", arch="ViT-bigG-14", version="laion2b_s39b_b160k",
                   freeze=True, layer="penultimate", always_return_pooled=True, legacy=False),
        P.size_embedder("original_size_as_tuple"),
        P.size_embedder("crop_coords_top_left"),
        P.size_embedder("target_size_as_tuple"),
    )
    first_stage = P.autoencoder_kl(P.ddconfig(attn_type="vanilla-xformers"))
    return P.engine(network, P.discrete_denoiser("EpsScaling"), cond, first_stage, scale_factor=0.13025,
                    # one image at a time through the VAE: a batched 1024² decode holds ~6.5 GiB of
                    # temporaries per image (26 GiB for 4 on one 16 GiB v5e chip; one at a time: 4.3)
                    decode_n_at_a_time=1)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.inference = P.inference(1024, 1024, ["tokenizer", "tokenizer_2"], crop_coords_top_left=[0, 0],
                                   resolutions=P.SDXL_RESOLUTIONS, refiner_config="inference/sd_xl_refiner")
    return config
