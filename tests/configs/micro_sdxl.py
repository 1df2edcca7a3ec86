"""tiny_sdxl with a two-level UNet (one res block a level, attention at the second): the SDXL
layout at the size whose train step several CPU processes compile in a test's time."""

from sgm_jax.configs.inference import tiny_sdxl


def model() -> dict:
    config = tiny_sdxl.model()
    config["params"]["network_config"]["params"].update(num_res_blocks=1, channel_mult=[1, 2],
                                                        attention_resolutions=[2], transformer_depth=[1, 1])
    return config


def get_config():
    config = tiny_sdxl.get_config()
    config.model = model()
    return config
