"""Autoencoder training (the seed's AutoencodingEngine with LPIPS and a PatchGAN) and the
trained autoencoder as a latent model's frozen first stage.

    from sgm_jax.autoencoding import load_first_stage, export_first_stage
    first_stage_config, params = load_first_stage("workdir/autoencoder_mnist")   # or a converted dir

The training loop reaches this package through `sgm_jax.training.autoencoder_task:AutoencoderTask`;
`python -m sgm_jax.autoencoding.firststage WORKDIR --safetensors OUT` exports.
"""

from typing import Any

__all__ = ["export_first_stage", "load_first_stage", "save_first_stage"]


def __getattr__(name: str) -> Any:  # lazy: `python -m sgm_jax.autoencoding.firststage` imports it once
    if name in __all__:
        from sgm_jax.autoencoding import firststage

        return getattr(firststage, name)
    raise AttributeError(name)
