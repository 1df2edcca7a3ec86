"""The seed's configs/inference/sd_2_1.yaml: Stable Diffusion 2.1-base, 512 px, eps-prediction,
OpenCLIP ViT-H text encoder (checkpoint prefix `cond_stage_model.model.`)."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _parts as P


def model(scaling: str = "EpsScaling") -> dict:
    network = P.unet(
        use_checkpoint=True,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=1024,
    )
    cond = P.conditioner(P.embedder("FrozenOpenCLIPEmbedder", "txt", freeze=True, layer="penultimate"))
    first_stage = P.autoencoder_kl(P.ddconfig())
    return P.engine(network, P.discrete_denoiser(scaling), cond, first_stage, scale_factor=0.18215)


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.inference = P.inference(512, 512, ["tokenizer"])
    return config
