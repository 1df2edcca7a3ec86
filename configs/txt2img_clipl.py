"""The seed's configs/example_training/txt2img-clipl.yaml: text-to-image at 256 px on an f8
latent, trainable CLIP ViT-L/14 text tower (legacy ucg: 10% of captions become ""), size and
crop micro-conditioning, eps-prediction over 1000 DDPM steps, LambdaLinear warm-up.

Sized for accelerators (the seed: one node of GPUs at batch 64; here bf16, data parallel):

    python train.py --config configs/txt2img_clipl.py \
        --config.data.params.train.datapipeline.urls='shards/data-{000000..000127}.tar' \
        --config.model.params.first_stage_config.params.ckpt_path=checkpoints/sd_vae  # a converted VAE

The CLIP tower starts random unless `model.params.ckpt_path` names a converted checkpoint
holding `conditioner.embedders_0` (the seed downloads openai/clip-vit-large-patch14 instead).
"""

from ml_collections import ConfigDict

from sgm_jax.configs import _training_parts as T
from sgm_jax.configs.inference import _parts as P


def model(legacy_ucg_value="") -> dict:
    network = P.unet(use_checkpoint=True, in_channels=4, out_channels=4, model_channels=320,
                     attention_resolutions=[1, 2, 4], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                     num_classes="sequential", adm_in_channels=1792, num_heads=1, transformer_depth=1, context_dim=768,
                     spatial_transformer_attn_type="softmax-xformers")
    clip = {"is_trainable": True, "input_key": "txt", "ucg_rate": 0.1, "legacy_ucg_value": legacy_ucg_value,
            "target": f"{P.ENCODERS}.FrozenCLIPEmbedder", "params": {"always_return_pooled": True}}
    cond = P.conditioner(clip, {**P.size_embedder("original_size_as_tuple"), "ucg_rate": 0.1},
                         {**P.size_embedder("crop_coords_top_left"), "ucg_rate": 0.1})
    first_stage = P.autoencoder_kl(P.ddconfig(attn_type="vanilla-xformers"))
    first_stage["params"]["ckpt_path"] = ""  # USER: a converted VAE directory or an autoencoder workdir
    engine = P.engine(network, P.discrete_denoiser("EpsScaling"), cond, first_stage, scale_factor=0.13025)
    engine["base_learning_rate"] = 1.0e-4
    engine["params"].update(log_keys=["txt"], scheduler_config=T.lambda_linear(10000), loss_fn_config=T.eps_loss(),
                            sampler_config=T.euler_sampler(50, 7.5), ckpt_path="")
    return engine


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model()
    config.data = T.streaming_data(T.image_datapipeline(256), batch_size=64)
    config.training = T.seed_lightning_training("txt2img_clipl", sample_prompts=(
        "a photograph of an astronaut riding a horse", "a red bicycle leaning on a wall", "a bowl of fruit",
        "a lighthouse at sunset"))
    config.mesh = {"data": -1, "fsdp": 1, "collective_matmul": True}
    return config
