"""PyTorch checkpoints in the seed's single-file layout <-> Flax params.

`convert_checkpoint(state_dict, config)` maps a flat `{seed key: np.ndarray}` dict (e.g.
`model.diffusion_model.input_blocks.0.0.weight`) plus a model config to the engine's params
`{"model", "conditioner", "first_stage"}`, raising CheckpointMismatchError with every missing,
unexpected and mis-shaped key. Per network: convert_unet, convert_vae, convert_clip_l, convert_openclip.
"""

from sgm_jax.convert.checkpoint import (convert_checkpoint, convert_file, export_checkpoint, load_params,
                                        open_checkpoint, read_metadata, save_params, save_safetensors)
from sgm_jax.convert.common import CheckpointMismatchError
from sgm_jax.convert.text import convert_clip_l, convert_openclip, export_clip_l, export_openclip
from sgm_jax.convert.unet import convert_unet, export_unet
from sgm_jax.convert.vae import convert_vae, export_vae

__all__ = [
    "CheckpointMismatchError", "convert_checkpoint", "convert_clip_l", "convert_file", "convert_openclip",
    "convert_unet", "convert_vae", "export_checkpoint", "export_clip_l", "export_openclip", "export_unet",
    "export_vae", "load_params", "open_checkpoint", "read_metadata", "save_params", "save_safetensors",
]
