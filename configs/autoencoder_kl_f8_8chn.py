"""The seed's configs/example_training/autoencoder/kl-f4/imagenet-kl_f8_8chn.yaml: an f8 KL
autoencoder with 8 latent channels and (xformers) attention in the middle blocks, LPIPS 0.25,
a learned log-variance and a PatchGAN from step 20001. Sized for accelerators, like kl-f4.
"""

from sgm_jax.configs import autoencoder_kl_f4 as f4


def get_config():
    config = f4.get_config()
    enc = f4.ddconfig(attn_type="vanilla-xformers", z_channels=8, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
    config.model = f4.model(encoder=enc, monitor="val/loss/rec")
    config.training.name = "autoencoder_kl_f8_8chn"
    return config
