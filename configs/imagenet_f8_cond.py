"""The seed's configs/example_training/imagenet-f8_cond.yaml: class-conditional ImageNet at
256 px on an f8 latent (1000 classes, sequence-dim class embedding as cross-attention
context), size and crop micro-conditioning with 20% dropout, eps-prediction, CFG 5.

Sized for accelerators (the seed: batch 64 on a GPU node; here bf16, data parallel). Data: tar
shards of `<key>.jpg` + `<key>.cls` (prepare_data.py packs class folders into them):

    python train.py --config configs/imagenet_f8_cond.py \
        --config.data.params.train.datapipeline.urls='imagenet/train-{000000..001023}.tar' \
        --config.model.params.first_stage_config.params.ckpt_path=checkpoints/sd_vae
"""

from ml_collections import ConfigDict

from sgm_jax.configs import _training_parts as T
from sgm_jax.configs.inference import _parts as P


def get_config() -> ConfigDict:
    network = P.unet(use_checkpoint=True, in_channels=4, out_channels=4, model_channels=256,
                     attention_resolutions=[1, 2, 4], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                     num_classes="sequential", adm_in_channels=1024, transformer_depth=1, context_dim=1024,
                     spatial_transformer_attn_type="softmax-xformers")
    classes = {"is_trainable": True, "input_key": "cls", "ucg_rate": 0.2,
               "target": f"{P.ENCODERS}.ClassEmbedder",
               "params": {"add_sequence_dim": True, "embed_dim": 1024, "n_classes": 1000}}
    cond = P.conditioner(classes, {**P.size_embedder("original_size_as_tuple"), "ucg_rate": 0.2},
                         {**P.size_embedder("crop_coords_top_left"), "ucg_rate": 0.2})
    first_stage = P.autoencoder_kl(P.ddconfig(attn_type="vanilla-xformers"))
    first_stage["params"]["ckpt_path"] = ""  # USER: a converted VAE directory or an autoencoder workdir
    model = P.engine(network, P.discrete_denoiser("EpsScaling"), cond, first_stage, scale_factor=0.13025)
    model["base_learning_rate"] = 1.0e-4
    model["params"].update(log_keys=["cls"], scheduler_config=T.lambda_linear(10000), loss_fn_config=T.eps_loss(),
                           sampler_config=T.euler_sampler(50, 5.0), ckpt_path="")
    config = ConfigDict()
    config.model = model
    pipeline = T.image_datapipeline(256, required_keys=("jpg", "cls"),
                                    crop_params={"h_key": "height", "w_key": "width"})
    config.data = T.streaming_data(pipeline, batch_size=64)
    config.training = T.seed_lightning_training("imagenet_f8_cond", sample_classes=(1, 9, 207, 279, 388, 417, 430, 980))
    config.mesh = {"data": -1, "fsdp": 1, "collective_matmul": True}
    return config
