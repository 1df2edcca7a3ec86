"""Autoencoder training (the seed's AutoencodingEngine with LPIPS and a PatchGAN) and the
trained autoencoder as a latent model's frozen first stage.

    from sgm_jax.autoencoding import load_first_stage, export_first_stage
    first_stage_config, params = load_first_stage("workdir/autoencoder_mnist")   # or a converted dir

The training loop reaches this package through `sgm_jax.autoencoding.task:AutoencoderTask`.
"""

from sgm_jax.autoencoding.firststage import export_first_stage, load_first_stage

__all__ = ["export_first_stage", "load_first_stage"]
