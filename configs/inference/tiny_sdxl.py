"""sd_xl_base shrunk for CPU tests: the same architecture and checkpoint layout (CLIP-L-style +
OpenCLIP-style text towers with the real 49,408-token vocabulary, sequential adm, per-level
transformer depths, f=8 AutoencoderKL) with tiny widths. Random weights only."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P

CLIP_WIDTH, OPENCLIP_WIDTH, POOLED_DIM, SIZE_DIM = 32, 32, 32, 16
TEXT = dict(vocab_size=49408, layers=2, heads=2)


def model() -> dict:
    network = P.unet(
        adm_in_channels=POOLED_DIM + 6 * SIZE_DIM,
        num_classes="sequential",
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 2],
        num_head_channels=16,
        use_linear_in_transformer=True,
        transformer_depth=[1, 1, 2],
        context_dim=CLIP_WIDTH + OPENCLIP_WIDTH,
    )
    cond = P.conditioner(
        # layer_idx = layers - 1: the input of the last block, as SDXL's 11 of 12.
        P.embedder("FrozenCLIPEmbedder", "txt", layer="hidden", layer_idx=TEXT["layers"] - 1, width=CLIP_WIDTH,
                   **TEXT),
        P.embedder("FrozenOpenCLIPEmbedder2", "txt", arch="ViT-bigG-14", freeze=True, layer="penultimate",
                   always_return_pooled=True, legacy=False, width=OPENCLIP_WIDTH, embed_dim=POOLED_DIM, **TEXT),
        P.size_embedder("original_size_as_tuple", SIZE_DIM),
        P.size_embedder("crop_coords_top_left", SIZE_DIM),
        P.size_embedder("target_size_as_tuple", SIZE_DIM),
    )
    first_stage = P.autoencoder_kl(P.ddconfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=64))
    return P.engine(network, P.discrete_denoiser("EpsScaling"), cond, first_stage, scale_factor=0.13025)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.inference = P.inference(64, 64, ["tokenizer", "tokenizer_2"], num_steps=4, dtype="float32",
                                   crop_coords_top_left=[0, 0], batch_per_device=8,
                                   resolutions=((64, 64), (96, 64), (64, 96)))
    return config
