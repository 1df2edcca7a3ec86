"""VideoUNet (Stable Video Diffusion): key manifest, config variants, conversion, parity.

Parity peer: diffusers' UNetSpatioTemporalConditionModel (the SVD UNet, PyTorch) with the same
random weights, mapped seed key -> diffusers key; it skips without torch / diffusers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.convert.common import flatten_params, torch_shape
from sgm_jax.convert.unet import UNET_PREFIX, convert_unet, export_unet, unet_abstract_params, unet_key_map
from sgm_jax.lora.names import seed_to_diffusers
from sgm_jax.nn.layers import timestep_embedding
from sgm_jax.nn.video_unet import VideoUNet

# every key of svd_xt.safetensors, from the seed's own DiffusionEngine (tests/make_svd_fixtures.py)
MANIFEST = Path(__file__).resolve().parent / "data" / "svd_manifest.json"

# scripts/sampling/configs/svd_xt.yaml's network_config params (svd.yaml's are the same).
SVD_XT = dict(
    adm_in_channels=768, num_classes="sequential", use_checkpoint=True, in_channels=8, out_channels=4,
    model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=1, context_dim=1024,
    spatial_transformer_attn_type="softmax-xformers", extra_ff_mix_layer=True, use_spatial_context=True,
    merge_strategy="learned_with_images", video_kernel_size=[3, 1, 1],
)
# SVD's layout at toy size: two levels, attention at the first (diffusers' block types below).
TINY = {**SVD_XT, "use_checkpoint": False, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
        "attention_resolutions": [1], "num_head_channels": 16, "context_dim": 24, "adm_in_channels": 12}


def random_params(abstract: Any, seed: int = 0) -> Any:
    """Every param random (zero-initialised output layers would hide errors); the mix
    factors wide enough that sigmoid(mix) is far from 1/2."""
    rng = np.random.default_rng(seed)

    def draw(path: Any, a: Any) -> np.ndarray:
        scale = 1.0 if "mix_factor" in jax.tree_util.keystr(path) else 0.1
        return (rng.standard_normal(a.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def seed_keys(abstract: Any) -> dict[str, list[int]]:
    """{seed key (no prefix): PyTorch shape} of a params tree."""
    flat = flatten_params(abstract)
    return {key: list(torch_shape(kind, flat[path].shape)) for path, (key, kind) in unet_key_map(abstract).items()}


# ---------------------------------------------------------------------------------------
# (1) the full-size SVD-XT network: exactly the seed's keys and shapes (nothing allocated)


def test_svd_xt_key_manifest() -> None:
    manifest = json.loads(MANIFEST.read_text())
    # use_checkpoint changes no param; without it the trace is quicker.
    abstract = unet_abstract_params(VideoUNet(**{**SVD_XT, "use_checkpoint": False}))
    ours = seed_keys(abstract)
    want = {k[len(UNET_PREFIX):]: v for k, v in manifest["keys"].items() if k.startswith(UNET_PREFIX)}
    assert sorted(set(want) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(want)) == [], "unexpected"
    assert {k: v for k, v in ours.items() if want[k] != v} == {}, "mis-shaped"
    assert len(ours) == 1428
    assert sum(int(np.prod(v)) for v in ours.values()) == sum(int(np.prod(v)) for v in want.values()) == 1_524_623_082
    assert all(v.dtype == jnp.float32 for v in flatten_params(abstract).values())


# ---------------------------------------------------------------------------------------
# (2) config variants: shapes only


def forward_shape(model: VideoUNet, frames: int = 2) -> tuple[Any, dict[str, list[int]]]:
    inputs = model.example_inputs(batch=2, size=4, num_frames=frames)
    out, variables = jax.eval_shape(lambda k: model.init_with_output(k, **inputs), jax.random.key(0))
    return out, seed_keys(variables["params"])


@pytest.mark.parametrize("name", ["fixed_cubic", "learned_time_context", "no_temporal_ca", "remat_bf16"])
def test_variant_shapes(name: str) -> None:
    variant = {
        "fixed_cubic": dict(merge_strategy="fixed", video_kernel_size=3, extra_ff_mix_layer=False),
        "learned_time_context": dict(merge_strategy="learned", use_spatial_context=False, time_context_dim=20),
        "no_temporal_ca": dict(disable_temporal_crossattention=True, attention_resolutions=[1, 2]),
        "remat_bf16": dict(use_checkpoint=True, dtype=jnp.bfloat16),
    }[name]
    out, keys = forward_shape(VideoUNet(**{**TINY, **variant}))
    chex.assert_shape(out, (4, 4, 4, 4))
    chex.assert_type(out, jnp.bfloat16 if name == "remat_bf16" else jnp.float32)
    block = "input_blocks.1."
    # The seed passes inner_dim to every temporal block, so ff_in exists whatever extra_ff_mix_layer says.
    assert block + "1.time_stack.0.ff_in.net.0.proj.weight" in keys
    if name == "fixed_cubic":  # a buffer in the seed, a constant here
        assert not any(k.endswith("mix_factor") for k in keys)
        assert keys[block + "0.time_stack.in_layers.2.weight"] == [32, 32, 3, 3, 3]
    else:
        assert keys[block + "0.time_mixer.mix_factor"] == [1]
        assert keys[block + "0.time_stack.in_layers.2.weight"] == [32, 32, 3, 1, 1]
    if name == "learned_time_context":
        assert keys[block + "1.time_stack.0.attn2.to_k.weight"] == [32, 20]
        assert keys[block + "1.transformer_blocks.0.attn2.to_k.weight"] == [32, 24]
    if name == "no_temporal_ca":
        assert not any(".time_stack.0.attn2." in k or ".time_stack.0.norm2." in k for k in keys)
        assert "input_blocks.3.1.time_pos_embed.2.weight" in keys  # attention at level 1 too


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="context_dim"):
        forward_shape(VideoUNet(**{**TINY, "context_dim": None}))
    with pytest.raises(ValueError, match="no option legacy"):
        forward_shape(VideoUNet(**{**TINY, "legacy": True}))
    with pytest.raises(ValueError, match="merge_strategy"):
        forward_shape(VideoUNet(**{**TINY, "merge_strategy": "average"}))
    model = VideoUNet(**TINY)
    inputs = model.example_inputs(batch=1, size=4, num_frames=2)
    del inputs["image_only_indicator"]
    with pytest.raises(ValueError, match="needs image_only_indicator"):
        jax.eval_shape(lambda k: model.init(k, **inputs, num_video_frames=2), jax.random.key(0))
    with pytest.raises(ValueError, match="does not fold"):
        jax.eval_shape(lambda k: model.init(k, **inputs, image_only_indicator=jnp.zeros((1, 3))), jax.random.key(0))


# ---------------------------------------------------------------------------------------
# (3) conversion


def test_export_convert_round_trip_fixed_buffers() -> None:
    kwargs = {**TINY, "merge_strategy": "fixed"}
    _, abstract = jax.eval_shape(
        lambda k: VideoUNet(**kwargs).init_with_output(k, **VideoUNet(**kwargs).example_inputs()), jax.random.key(0))
    params = random_params(abstract["params"])
    state_dict = export_unet(params)
    assert state_dict[UNET_PREFIX + "input_blocks.1.0.time_stack.in_layers.2.weight"].shape == (32, 32, 3, 1, 1)
    # The seed's file holds the fixed AlphaBlenders' buffers: accepted, not params.
    buffers = {UNET_PREFIX + "input_blocks.1.1.time_mixer.mix_factor": np.array([0.5], np.float32)}
    back = convert_unet({**state_dict, **buffers}, kwargs, network_cls=VideoUNet)
    chex.assert_trees_all_equal(back, params)


# ---------------------------------------------------------------------------------------
# (4) parity with diffusers' SVD UNet, same random weights

_RES_PARTS = ("in_layers", "emb_layers", "out_layers", "skip_connection")


def seed_to_diffusers_svd(key: str, n: int) -> str:
    """A seed VideoUNet key -> UNetSpatioTemporalConditionModel's (what diffusers'
    convert_svd_to_diffusers does): the UNet map of sgm_jax.lora.names, with a VideoResBlock's
    own params under `spatial_res_block`, its `time_stack` as `temporal_res_block`, and a
    SpatialVideoTransformer's `time_stack.i` as `temporal_transformer_blocks.i`."""
    module, leaf = key.rsplit(".", 1)
    m = re.fullmatch(r"((?:input|output)_blocks\.\d+\.0|middle_block\.[02])\.(.+)", module)
    if m and m.group(1) != "input_blocks.0.0" and m.group(2).split(".")[0] in _RES_PARTS + ("time_stack", "time_mixer"):
        head, rest = m.groups()
        if rest == "time_mixer":
            block = seed_to_diffusers(f"{head}.in_layers.0", n).rsplit(".", 1)[0]
            return f"{block}.time_mixer.{leaf}"
        part = "temporal_res_block" if rest.startswith("time_stack.") else "spatial_res_block"
        block, name = seed_to_diffusers(f"{head}.{rest.removeprefix('time_stack.')}", n).rsplit(".", 1)
        return f"{block}.{part}.{name}.{leaf}"
    module = re.sub(r"\.time_stack\.(\d+)", r".temporal_transformer_blocks.\1", module)
    module = module.replace("time_pos_embed.0", "time_pos_embed.linear_1").replace("time_pos_embed.2", "time_pos_embed.linear_2")
    return f"{seed_to_diffusers(module, n)}.{leaf}"


def test_diffusers_parity() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is the parity peer (pip install torch)")
    diffusers = pytest.importorskip("diffusers", reason="diffusers' SVD UNet is the parity peer (pip install diffusers)")
    peer = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, cross_attention_dim=24,
        num_attention_heads=(2, 4), num_frames=3,
    ).eval()
    # diffusers builds the res blocks of CrossAttnDownBlockSpatioTemporal and of both up block
    # types with GroupNorm eps 1e-6; the seed's (every ResBlock's GroupNorm32) is 1e-5. Set the
    # seed's: with diffusers' own, it is 8e-5 (relative) away from the seed's VideoUNet.
    for name, norm in peer.named_modules():
        if ".resnets." in name and isinstance(norm, torch.nn.GroupNorm):
            norm.eps = 1e-5
    model = VideoUNet(**TINY)
    _, variables = jax.eval_shape(lambda k: model.init_with_output(k, **model.example_inputs()), jax.random.key(0))
    params = random_params(variables["params"])
    seed_sd = export_unet(params, prefix="")
    peer_sd = {seed_to_diffusers_svd(k, 1): torch.from_numpy(v) for k, v in seed_sd.items()}
    peer.load_state_dict(peer_sd, strict=True)  # every key of both, one to one

    b, t, size = 2, 3, 8
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((b, t, 8, size, size)).astype(np.float32)
    timestep = np.float32(417.0)
    context = rng.standard_normal((b, 1, 24)).astype(np.float32)
    added_time_ids = np.array([[6, 127, 0.02], [11, 30, 0.5]], np.float32)  # fps, motion bucket, cond aug
    with torch.no_grad():
        ref = peer(torch.from_numpy(sample), torch.tensor([timestep]), torch.from_numpy(context),
                   torch.from_numpy(added_time_ids)).sample.numpy()

    # The seed's inputs: frames folded into the batch, the conditioner's vector (three
    # ConcatTimestepEmbedderND, outdim 4 here) and crossattn repeated per frame, no still images.
    y = jnp.concatenate([timestep_embedding(added_time_ids[:, i], 4) for i in range(3)], axis=-1)
    x = sample.reshape(b * t, 8, size, size).transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p: model.apply(
            {"params": p}, x, jnp.full((b * t,), timestep), jnp.repeat(context, t, axis=0),
            jnp.repeat(y, t, axis=0), num_video_frames=t, image_only_indicator=jnp.zeros((b, t))))(params)
    ref = ref.reshape(b * t, 4, size, size).transpose(0, 2, 3, 1)
    chex.assert_shape(out, ref.shape)
    rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"diffusers SVD UNet parity: max relative error {rel:.3e}")
    assert rel <= 1e-4, rel


def test_built_from_seed_network_config() -> None:
    from sgm_jax.engine import build_engine

    engine = build_engine({
        "network_config": {"target": "sgm.modules.diffusionmodules.video_model.VideoUNet", "params": TINY},
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.Denoiser", "params": {
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.VScalingWithEDMcNoise"}}},
    }, dtype="bfloat16")
    assert isinstance(engine.network, VideoUNet) and engine.network.dtype == jnp.bfloat16
    assert engine.network.video_kernel_size == [3, 1, 1]
