"""configs/inference/tiny_sdxl shrunk further for the compile-check tests (one text-tower layer,
two UNet levels, a 2-level VAE): SDXL's structure, compiled by XLA:TPU in seconds."""

from ml_collections import ConfigDict
from sgm_jax.configs.inference import _parts as P
from sgm_jax.configs.inference import tiny_sdxl

def model():
    model = tiny_sdxl.model()
    net = model["params"]["network_config"]["params"]
    net.update(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], transformer_depth=[1, 1])
    for spec in model["params"]["conditioner_config"]["params"]["emb_models"]:
        if spec["input_key"] == "txt":
            spec["params"]["layers"] = 1
            if "layer_idx" in spec["params"]:
                spec["params"]["layer_idx"] = 0
    model["params"]["first_stage_config"]["params"]["ddconfig"].update(ch_mult=(1, 2), num_res_blocks=1)
    return model

def get_config():
    config = ConfigDict()
    config.model = model()
    config.inference = P.inference(32, 32, ["tokenizer", "tokenizer_2"], num_steps=4, dtype="bfloat16",
                                   crop_coords_top_left=[0, 0], batch_per_device=2, resolutions=((32, 32),))
    return config
