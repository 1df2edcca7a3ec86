"""sd_2_1 shrunk for CPU tests: the same architecture and checkpoint layout (OpenCLIP-style
text tower under `cond_stage_model.model.` with the real 49,408-token vocabulary, attention
at every level, f=8 AutoencoderKL) with tiny widths. Random weights only."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P

TEXT_WIDTH = 32


def model(scaling: str = "EpsScaling") -> dict:
    network = P.unet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 2],
        num_head_channels=16,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=TEXT_WIDTH,
    )
    cond = P.conditioner(P.embedder("FrozenOpenCLIPEmbedder", "txt", freeze=True, layer="penultimate",
                                    vocab_size=49408, width=TEXT_WIDTH, heads=2, layers=2, embed_dim=TEXT_WIDTH))
    first_stage = P.autoencoder_kl(P.ddconfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=64))
    return P.engine(network, P.discrete_denoiser(scaling), cond, first_stage, scale_factor=0.18215)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.inference = P.inference(64, 64, ["tokenizer"], num_steps=4, dtype="float32", batch_per_device=8)
    return config
