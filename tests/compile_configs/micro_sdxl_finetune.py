from sgm_jax.configs import sdxl_finetune
from sgm_jax.configs.inference import tiny_sdxl


def get_config():
    model = tiny_sdxl.model()
    net = model["params"]["network_config"]["params"]
    net.update(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], transformer_depth=[1, 1])
    for spec in model["params"]["conditioner_config"]["params"]["emb_models"]:
        if spec["input_key"] == "txt":
            spec["params"]["layers"] = 1
            if "layer_idx" in spec["params"]:
                spec["params"]["layer_idx"] = 0
    dd = model["params"]["first_stage_config"]["params"]["ddconfig"]
    dd.update(ch_mult=(1, 2), num_res_blocks=1)
    return sdxl_finetune.finetune(model, name="micro", size=32, buckets=((32, 32),), batch_size=8)
