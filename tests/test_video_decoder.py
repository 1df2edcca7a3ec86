"""VideoDecoder (SVD's temporal first stage): parity with diffusers, the full-size key manifest,
chunked decoding, the time modes and the seed-layout config path.

Parity peer: diffusers' AutoencoderKLTemporalDecoder (PyTorch), the same network as the seed's
AutoencodingEngine(Encoder, VideoDecoder); its keys are mapped to the seed's by
`diffusers_to_seed` below, then converted by sgm_jax.convert.vae. Skips without torch / diffusers.
"""

from __future__ import annotations

import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.convert.common import flatten_params, torch_shape
from sgm_jax.convert.vae import abstract_vae_params, convert_vae, export_vae, vae_key_map
from sgm_jax.nn.vae import AutoencoderKL, Decoder, autoencoder_from_config
from sgm_jax.nn.video_vae import VideoDecoder


def _ddconfig(**over: Any) -> dict[str, Any]:
    # configs/inference/svd.yaml's encoder_config / decoder_config params.
    cfg = dict(attn_type="vanilla", double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
               ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    return {**cfg, **over}


def svd_first_stage(**over: Any) -> dict[str, Any]:
    """configs/inference/svd.yaml's first_stage_config (the decoder's params updated by `over`)."""
    return {"target": "sgm.models.autoencoder.AutoencodingEngine", "params": {
        "loss_config": {"target": "torch.nn.Identity"},
        "regularizer_config": {"target": "sgm.modules.autoencoding.regularizers.DiagonalGaussianRegularizer"},
        "encoder_config": {"target": "sgm.modules.diffusionmodules.model.Encoder", "params": _ddconfig()},
        "decoder_config": {"target": "sgm.modules.autoencoding.temporal_ae.VideoDecoder",
                           "params": _ddconfig(video_kernel_size=[3, 1, 1], **over)}}}


def tiny_first_stage(**over: Any) -> dict[str, Any]:
    """SVD's layout at toy size: two levels of 32 / 64 channels. num_res_blocks stays 2: diffusers
    sizes its mid block by it, and builds the seed's (block, attention, block) only at 2."""
    cfg = svd_first_stage()
    for part in ("encoder_config", "decoder_config"):
        cfg["params"][part]["params"].update(ch=32, ch_mult=[1, 2], resolution=16)
    cfg["params"]["decoder_config"]["params"].update(over)
    return cfg


def diffusers_to_seed(key: str, levels: int) -> str | None:
    """A diffusers AutoencoderKLTemporalDecoder key -> the seed's AutoencodingEngine key (None:
    diffusers' `quant_conv`, which the seed's AutoencodingEngine does not have).

    diffusers lists the decoder's up blocks from the lowest resolution (`up_blocks.0` is the
    seed's `up.{levels-1}`), wraps each VideoResBlock's halves in `spatial_res_block` /
    `temporal_res_block`, and names the temporal ResBlock's layers norm1/conv1/norm2/conv2
    where the seed's openaimodel ResBlock has in_layers.0/.2 and out_layers.0/.3.
    """
    if key.startswith("quant_conv."):
        return None
    rules = (
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^decoder\.time_conv_out\.", lambda m: "decoder.conv_out.time_mix_conv."),
    )
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    for old, new in (("temporal_res_block.norm1.", "time_stack.in_layers.0."),
                     ("temporal_res_block.conv1.", "time_stack.in_layers.2."),
                     ("temporal_res_block.norm2.", "time_stack.out_layers.0."),
                     ("temporal_res_block.conv2.", "time_stack.out_layers.3."),
                     ("time_mixer.mix_factor", "mix_factor"), ("spatial_res_block.", ""),
                     ("conv_shortcut.", "nin_shortcut."), ("conv_norm_out.", "norm_out."), ("group_norm.", "norm."),
                     ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
        key = key.replace(old, new)
    return key


def _is_attn_proj(seed_key: str) -> bool:
    # diffusers' attention projections are Linear [C, C]; the seed's are 1x1 Conv2d [C, C, 1, 1].
    return bool(re.search(r"\.(q|k|v|proj_out)\.weight$", seed_key))


def diffusers_peer(torch: Any, diffusers: Any, cfg: dict[str, Any]) -> Any:
    """The diffusers model of the same layout as the seed config `cfg` (encoder = decoder params)."""
    from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import AutoencoderKLTemporalDecoder

    p = cfg["params"]["decoder_config"]["params"]
    widths = tuple(p["ch"] * m for m in p["ch_mult"])
    return AutoencoderKLTemporalDecoder(
        in_channels=p["in_channels"], out_channels=p["out_ch"], down_block_types=("DownEncoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=p["num_res_blocks"], latent_channels=p["z_channels"])


def seed_keys(model: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    """{seed key: PyTorch shape} of the model's params, built abstractly (nothing allocated)."""
    abstract = abstract_vae_params(model)
    flat = flatten_params(abstract)
    return {key: torch_shape(kind, flat[path].shape) for path, (key, kind) in vae_key_map(abstract).items()}


def test_svd_decoder_key_manifest() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch builds the peer's key manifest (pip install torch)")
    diffusers = pytest.importorskip("diffusers", reason="diffusers' SVD VAE is the manifest peer (pip install diffusers)")
    cfg = svd_first_stage()
    model = autoencoder_from_config(cfg)
    assert model.decoder_target == "VideoDecoder" and not model.use_quant_conv
    with torch.device("meta"):  # shapes only: nothing allocated
        peer = diffusers_peer(torch, diffusers, cfg)
    levels = len(cfg["params"]["decoder_config"]["params"]["ch_mult"])
    want = {}
    for key, value in peer.state_dict().items():
        seed = diffusers_to_seed(key, levels)
        if seed is not None:
            want[seed] = tuple(value.shape) + ((1, 1) if _is_attn_proj(seed) and value.ndim == 2 else ())
    ours = seed_keys(model)
    assert sorted(set(want) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(want)) == [], "unexpected"
    assert {k: (v, want[k]) for k, v in ours.items() if want[k] != v} == {}, "mis-shaped"
    decoder = {k: v for k, v in ours.items() if k.startswith("decoder.")}
    assert len(decoder) == 266 and sum(int(np.prod(v)) for v in decoder.values()) == 63_579_183


def _randomise(torch: Any, peer: Any, seed: int = 0) -> None:
    """Every weight random (default inits would leave mix_factor at 0: alpha = 1/2 hides a
    swapped blend); norms around 1, mix factors wide enough that sigmoid is far from 1/2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peer.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("mix_factor"):
                param.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def test_diffusers_parity_and_chunks() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is the parity peer (pip install torch)")
    diffusers = pytest.importorskip("diffusers", reason="diffusers' SVD VAE is the parity peer (pip install diffusers)")
    cfg = tiny_first_stage()
    peer = diffusers_peer(torch, diffusers, cfg).eval()
    _randomise(torch, peer)
    levels = len(cfg["params"]["decoder_config"]["params"]["ch_mult"])
    seed_sd = {}
    for key, value in peer.state_dict().items():
        seed = diffusers_to_seed(key, levels)
        if seed is not None:
            array = value.numpy()
            seed_sd["first_stage_model." + seed] = array[..., None, None] if _is_attn_proj(seed) and array.ndim == 2 \
                else array
    model = autoencoder_from_config(cfg)
    params = convert_vae(seed_sd, model)  # every key of the model, one to one

    videos, t, side = 2, 3, 4
    rng = np.random.default_rng(1)
    z = rng.standard_normal((videos * t, 4, side, side)).astype(np.float32)
    with torch.no_grad():
        ref = peer.decode(torch.from_numpy(z), num_frames=t).sample.numpy().transpose(0, 2, 3, 1)
    decode = jax.jit(lambda p, z, timesteps=None: model.apply({"params": p}, z, timesteps=timesteps,
                                                              method=AutoencoderKL.decode), static_argnums=2)
    z_nhwc = z.transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(decode(params, z_nhwc, t))  # two clips of T=3, frames folded into the batch
        chunk = np.asarray(decode(params, z_nhwc[t:], None))  # one decoding_t chunk: timesteps = its length
    chex.assert_shape([out, ref], (videos * t, 2 * side, 2 * side, 3))  # f = 2: two levels
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"diffusers AutoencoderKLTemporalDecoder decode parity: max relative error {rel:.3e}")
    assert rel <= 1e-4, rel
    np.testing.assert_allclose(chunk, out[t:], rtol=0, atol=1e-5 * np.abs(out).max())
    # Frames of one clip see each other (time_stack, time_mix_conv): a chunk of 2 differs.
    assert not np.allclose(np.asarray(decode(params, z_nhwc[:2], None)), out[:2], atol=1e-3)


def test_time_modes_key_names_and_errors() -> None:
    for mode, has_stack, has_video_attn in (("conv-only", True, False), ("all", True, True),
                                            ("attn-only", False, True)):
        keys = set(seed_keys(autoencoder_from_config(tiny_first_stage(time_mode=mode))))
        assert ("decoder.mid.block_1.time_stack.in_layers.2.weight" in keys) == has_stack, mode
        assert ("decoder.conv_out.time_mix_conv.weight" in keys) == has_stack, mode
        video_attn = {"decoder.mid.attn_1.mix_factor", "decoder.mid.attn_1.video_time_embed.2.weight",
                      "decoder.mid.attn_1.time_mix_block.ff_in.net.0.proj.weight",
                      "decoder.mid.attn_1.time_mix_block.attn2.to_out.0.weight",
                      "decoder.mid.attn_1.time_mix_block.norm_in.weight", "decoder.mid.attn_1.proj_out.weight"}
        assert (video_attn <= keys) == has_video_attn, mode
        assert not any(k.startswith("encoder.") and ("time" in k or "mix" in k) for k in keys)
    z = jnp.zeros((3, 4, 4, 4))
    for bad in ({"time_mode": "only-last-conv"}, {"merge_strategy": "learned_with_images"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            jax.eval_shape(lambda: autoencoder_from_config(tiny_first_stage(**bad)).init(jax.random.key(0), z,
                                                                                        method="decode"))
    with pytest.raises(ValueError, match="do not fold"):
        jax.eval_shape(lambda: autoencoder_from_config(tiny_first_stage()).init(
            jax.random.key(0), z, timesteps=2, method="decode"))


def _dec_args(cfg: dict[str, Any]) -> dict[str, Any]:
    p = cfg["params"]["decoder_config"]["params"]
    return dict(ch=p["ch"], out_ch=p["out_ch"], ch_mult=tuple(p["ch_mult"]), num_res_blocks=p["num_res_blocks"],
                attn_resolutions=(), resolution=p["resolution"], z_channels=p["z_channels"])


def test_reduces_to_the_image_decoder_without_time_mixing() -> None:
    """time_mode "all" with every blend on the spatial path and time_mix_conv the identity is
    the image Decoder on each frame (the temporal layers' own maths is the parity test's)."""
    args = _dec_args(tiny_first_stage())
    video, image = VideoDecoder(time_mode="all", video_kernel_size=(3, 1, 1), **args), Decoder(**args)
    z = np.random.default_rng(2).standard_normal((3, 4, 4, 4)).astype(np.float32)
    abstract = jax.eval_shape(lambda: video.init(jax.random.key(0), z, timesteps=3))["params"]
    rng = np.random.default_rng(3)
    flat = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in flatten_params(abstract).items()}
    for path in flat:
        if path[-1] == "mix_factor":  # VideoResBlock weights the temporal path by alpha, VideoBlock the spatial
            flat[path] = np.full((1,), 30.0 if "attn" in path[-2] else -30.0, np.float32)
    eye = np.zeros((3, 1, 1, 3, 3), np.float32)
    eye[1, 0, 0] = np.eye(3)
    flat[("conv_out", "time_mix_conv", "kernel")], flat[("conv_out", "time_mix_conv", "bias")] = eye, np.zeros(3, np.float32)
    video_params: dict[str, Any] = {}
    for path, value in flat.items():
        node = video_params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    image_abstract = jax.eval_shape(lambda: image.init(jax.random.key(0), z))["params"]
    image_params = jax.tree_util.tree_map_with_path(
        lambda path, _: flat[tuple(p.key for p in path)], image_abstract)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda p: video.apply({"params": p}, z, timesteps=3))(video_params)
        want = jax.jit(lambda p: image.apply({"params": p}, z))(image_params)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_fixed_buffers_and_bfloat16_compute() -> None:
    model = autoencoder_from_config(tiny_first_stage(merge_strategy="fixed", alpha=0.3))
    abstract = abstract_vae_params(model)
    assert not any("mix_factor" in k for k in seed_keys(model))  # a constant, as the seed's buffer
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, np.float32), abstract)
    sd = export_vae(params)
    sd["first_stage_model.decoder.mid.block_1.mix_factor"] = np.array([0.3], np.float32)  # the seed's buffer
    convert_vae(sd, model)  # accepted, left out
    low = autoencoder_from_config(tiny_first_stage(), dtype=jnp.bfloat16)
    out = jax.eval_shape(lambda: low.init_with_output(jax.random.key(0), jnp.zeros((3, 4, 4, 4)),
                                                      method="decode")[0])
    assert out.dtype == jnp.bfloat16 and out.shape == (3, 8, 8, 3)
