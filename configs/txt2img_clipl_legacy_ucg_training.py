"""The seed's configs/example_training/txt2img-clipl-legacy-ucg-training.yaml. The seed's two
txt2img-clipl files differ only in whitespace: both drop captions the legacy way (10% of
captions replaced by "" before the trainable CLIP tower, instead of zeroing its output)."""

from sgm_jax.configs import txt2img_clipl


def get_config():
    config = txt2img_clipl.get_config()
    config.training.name = "txt2img_clipl_legacy_ucg_training"
    return config
