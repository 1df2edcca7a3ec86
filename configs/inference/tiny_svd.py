"""svd_xt shrunk for CPU tests: the same architecture and checkpoint layout (VideoUNet with
learned-with-images merges, OpenCLIP-style image tower, AutoencoderKLModeOnly frame encoder,
VideoDecoder) at toy widths, 3 frames of 64x64. Random weights only. The tower takes 224x224 input
as ViT-H-14 does (the seed's embedder resizes to 224 whatever the tower), so the seed's own modules
build this config too (tests/make_svd_fixtures.py, with the tower as an open_clip model config)."""

from ml_collections import ConfigDict

from sgm_jax.configs.inference import _svd as S

TOWER = dict(image_size=224, patch_size=32, width=32, layers=2, heads=2, embed_dim=24, act="gelu")
TINY_DD = dict(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, resolution=64)


def get_config() -> ConfigDict:
    config = ConfigDict()
    unet = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                num_head_channels=16, context_dim=24, adm_in_channels=3 * 8, use_checkpoint=False)
    config.model = S.model(num_frames=3, max_scale=3.0, min_scale=1.5, num_steps=3, unet=unet,
                           cond=S.conditioner(TOWER, outdim=8, encoder_dd=TINY_DD), vae=S.first_stage(dd=TINY_DD))
    config.inference = S.inference(64, 64, num_frames=3, num_steps=3, max_scale=3.0, min_scale=1.5,
                                   dtype="float32", decoding_t=2)
    return config
