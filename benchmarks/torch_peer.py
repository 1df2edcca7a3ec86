"""PyTorch peers for the speed benchmarks: sgm_jax UNet configs <-> diffusers' UNet2DConditionModel.

Bench-only: imports torch and diffusers (`pip install diffusers`), which are never runtime
dependencies of sgm_jax. Each `*_configs()` returns `(sgm_unet_kwargs, diffusers_kwargs)`
describing the same network, so both frameworks time the same architecture.

How the seed's UNetModel maps onto diffusers:
  model_channels * channel_mult    -> block_out_channels
  num_res_blocks                   -> layers_per_block (output levels have one more, in both)
  level with attention (ds in attention_resolutions) -> CrossAttn{Down,Up}Block2D, else {Down,Up}Block2D
  middle block (res, SpatialTransformer, res) -> UNetMidBlock2DCrossAttn (always: the seed keeps
                                      the middle transformer even with attention_resolutions=[])
  num_head_channels=64             -> attention_head_dim = heads per level (diffusers' legacy
                                      naming: that argument is the number of heads)
  use_linear_in_transformer        -> use_linear_projection
  transformer_depth                -> transformer_layers_per_block
  num_classes="sequential"         -> class_embed_type="projection" (Linear-SiLU-Linear), or for
                                      SDXL addition_embed_type="text_time" (same MLP on 2816 inputs)
"""

from __future__ import annotations

from typing import Any


def mnist_cond_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """configs/mnist_cond.py's UNet: 28x28x1, no attention in the levels, sequential class emb."""
    from sgm_jax.configs import mnist_cond

    sgm = dict(mnist_cond.unet()["params"])
    mc, mult = sgm["model_channels"], sgm["channel_mult"]
    widths = tuple(mc * m for m in mult)
    mid_heads = widths[-1] // sgm["num_head_channels"]
    peer = dict(
        sample_size=28, in_channels=sgm["in_channels"], out_channels=sgm["out_channels"],
        down_block_types=("DownBlock2D",) * len(mult), up_block_types=("UpBlock2D",) * len(mult),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=widths, layers_per_block=sgm["num_res_blocks"], norm_num_groups=32,
        # The seed's middle SpatialTransformer has context_dim=None: its attn2 is self-attention
        # over the 64-wide tokens. diffusers builds attn2 from cross_attention_dim and, called with
        # encoder_hidden_states=None, attends to the hidden states: the same layer.
        cross_attention_dim=widths[-1], attention_head_dim=mid_heads, use_linear_projection=False,
        class_embed_type="projection", projection_class_embeddings_input_dim=sgm["adm_in_channels"],
        flip_sin_to_cos=True, freq_shift=0,
    )
    return sgm, peer


def mid_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """An SD-like mid-size UNet: 3 levels (128, 256, 512), attention at the 2 lower levels."""
    sgm = dict(in_channels=4, out_channels=4, model_channels=128, channel_mult=[1, 2, 4], num_res_blocks=2,
               attention_resolutions=[4, 2], transformer_depth=1, context_dim=768, num_head_channels=64,
               use_linear_in_transformer=True)
    return sgm, diffusers_from_sgm(sgm, sample_size=32)


def sdxl_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """SDXL base 1.0's UNet (2.6 B params): configs/inference/sd_xl_base.py when importable."""
    try:
        from sgm_jax.configs.inference import sd_xl_base

        sgm = dict(sd_xl_base.model()["params"]["network_config"]["params"])
    except Exception:  # that config may be in flux: the same numbers, from the seed's yaml
        sgm = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4,
                   out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                   channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
                   transformer_depth=[1, 2, 10], context_dim=2048)
    peer = diffusers_from_sgm(sgm, sample_size=128)
    # SDXL's label_emb is diffusers' add_embedding: text_embeds (1280) + 6 size ids x 256 Fourier.
    peer.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=sgm["adm_in_channels"])
    return sgm, peer


def diffusers_from_sgm(sgm: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """diffusers kwargs for a seed UNet with attention levels (num_head_channels set)."""
    mc, mult = sgm["model_channels"], list(sgm["channel_mult"])
    widths = tuple(mc * m for m in mult)
    attn_res = set(sgm["attention_resolutions"])
    has_attn = [2**i in attn_res for i in range(len(mult))]
    depth = sgm.get("transformer_depth", 1)
    depth = [depth] * len(mult) if isinstance(depth, int) else list(depth)
    return dict(
        sample_size=sample_size, in_channels=sgm["in_channels"], out_channels=sgm["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=widths, layers_per_block=sgm["num_res_blocks"], norm_num_groups=32,
        cross_attention_dim=sgm["context_dim"],
        attention_head_dim=tuple(w // sgm["num_head_channels"] for w in widths),
        transformer_layers_per_block=tuple(depth),
        use_linear_projection=bool(sgm.get("use_linear_in_transformer", False)),
        flip_sin_to_cos=True, freq_shift=0,
    )


def build_diffusers_unet(peer: dict[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**peer)


def count_torch(model) -> int:
    return sum(p.numel() for p in model.parameters())
