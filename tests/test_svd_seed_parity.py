"""Stable Video Diffusion against the seed's own modules: tests/make_svd_fixtures.py ran the seed's
PyTorch code (float32, CPU, random weights from tests/svd_seed.py's recipe) and kept the inputs and
outputs under tests/data/svd_seed/; here the same weights, converted from the seed's key layout by
our converter, go through sgm_jax. Tolerance: max |ours - seed| <= 1e-4 * max |seed|.

- the guiders (LinearPredictionGuider, TrianglePredictionGuider with two periods fused by max);
- SVD's full-width blocks: input_blocks.8 of svd_xt.yaml's VideoUNet (VideoResBlock 1280 then
  SpatialVideoTransformer 1280 / 20 heads / context 1024), built from our VideoUNet's own plan;
- configs/inference/tiny_svd.py whole: the conditioner's c / uc (OpenCLIP-style image tower after
  the kornia resize, fps / motion / cond_aug embeddings, the frame encoder's latents), one VideoUNet
  call, the 3-step guided EDM trajectory over 3 frames and the VideoDecoder's chunked decode.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.config_files import load_config
from sgm_jax.convert.checkpoint import convert_checkpoint, validate_checkpoint
from sgm_jax.convert.common import convert_state_dict
from sgm_jax.convert.layout import engine_parts
from sgm_jax.convert.unet import unet_key_map
from sgm_jax.diffusion.guiders import LinearPredictionGuider, TrianglePredictionGuider
from sgm_jax.inference.pipeline import Pipeline
from sgm_jax.inference.video import video_conditioning, video_from_noise, video_spec
from sgm_jax.nn.unet import TimestepEmbedSequential
from sgm_jax.nn.video_unet import VideoUNet
from svd_seed import FIXTURES, REQUEST, TINY_CONFIG, load_fixture, random_state_dict
from test_vae import nhwc
from test_video_unet import SVD_XT

RTOL = 1e-4


def assert_close(got: Any, want: np.ndarray, what: str, rtol: float = RTOL) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != seed's {want.shape}"
    err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
    assert err <= rtol * scale, f"{what}: max |ours - seed| = {err:.3g} > {rtol} * {scale:.3g}"


def test_guiders_match_the_seeds():
    record, a = load_fixture("guiders")
    x, sigma = jnp.asarray(nhwc(a["x_nchw"])), jnp.asarray(a["sigma"])
    linear = LinearPredictionGuider(**record["linear"])
    triangle = TrianglePredictionGuider(**{**record["triangle"], "period": tuple(record["triangle"]["period"])})
    assert_close(linear(x, sigma), nhwc(a["linear_output_nchw"]), "LinearPredictionGuider")
    assert_close(triangle(x, sigma), nhwc(a["triangle_output_nchw"]), "TrianglePredictionGuider")


def test_full_width_video_blocks_match_the_seeds():
    record, a = load_fixture("blocks_1280")
    layers = VideoUNet(**{**SVD_XT, "use_checkpoint": False}).build_plan(True).input_blocks[8]
    assert [kind for kind, _, _ in layers] == ["video_res", "video_attn"]
    x, emb, context = jnp.asarray(nhwc(a["x_nchw"])), jnp.asarray(a["emb"]), jnp.asarray(a["context"])
    indicator = jnp.asarray(a["image_only_indicator"])
    block = TimestepEmbedSequential(layers)
    abstract = jax.eval_shape(lambda: block.init(jax.random.key(0), x, emb, context, indicator))["params"]
    weights = random_state_dict(record["keys"], record["weight_seed"])
    params = convert_state_dict(weights, unet_key_map(abstract), abstract)  # every seed key consumed, none missing
    out = jax.jit(lambda p: block.apply({"params": p}, x, emb, context, indicator))(params)
    res_only = TimestepEmbedSequential(layers[:1])
    res_out = jax.jit(lambda p: res_only.apply({"params": {"0": p["0"]}}, x, emb, context, indicator))(params)
    assert_close(res_out, nhwc(a["res_out_nchw"]), "VideoResBlock(1280)")
    assert_close(out, nhwc(a["output_nchw"]), "VideoResBlock + SpatialVideoTransformer(1280)")


@pytest.fixture(scope="module")
def tiny_svd() -> dict[str, Any]:
    record, a = load_fixture("trajectory")
    config = load_config(str(TINY_CONFIG))
    state_dict = random_state_dict(record["keys"], record["weight_seed"])  # the seed's whole engine
    params = convert_checkpoint(state_dict, config)
    return {"record": record, "arrays": a, "pipeline": Pipeline(config, params)}


def _request(a: dict[str, np.ndarray]) -> dict[str, Any]:
    return dict(image=jnp.asarray(nhwc(a["image_nchw"])), cond_noise=jnp.asarray(nhwc(a["cond_noise_nchw"])),
                fps_id=jnp.float32(REQUEST["fps_id"]), motion_bucket_id=jnp.float32(REQUEST["motion_bucket_id"]),
                cond_aug=jnp.float32(REQUEST["cond_aug"]))


def test_conditioning_matches_the_seeds(tiny_svd):
    a, pipeline = tiny_svd["arrays"], tiny_svd["pipeline"]
    c, uc = jax.jit(lambda p, r: video_conditioning(pipeline.engine, p, num_frames=REQUEST["num_frames"], **r))(
        pipeline.params, _request(a))
    for name, cond in (("c", c), ("uc", uc)):
        assert_close(cond["crossattn"], a[f"{name}_crossattn"], f"{name}.crossattn (OpenCLIP image embedding)")
        assert_close(cond["vector"], a[f"{name}_vector"], f"{name}.vector (fps / motion / cond_aug)")
        assert_close(cond["concat"], nhwc(a[f"{name}_concat_nchw"]), f"{name}.concat (frame encoder latents)")
    assert float(np.abs(np.asarray(c["crossattn"])).max()) > 0.1  # the seed zeroes uc's, not c's


def test_video_unet_call_matches_the_seeds(tiny_svd):
    a, engine, params = tiny_svd["arrays"], tiny_svd["pipeline"].engine, tiny_svd["pipeline"].params
    t = REQUEST["num_frames"]
    x = nhwc(a["unet_x_nchw"])
    out = jax.jit(lambda p: engine.network.apply(
        {"params": p}, jnp.asarray(x), jnp.asarray(a["unet_timesteps"]),
        context=jnp.concatenate([a["uc_crossattn"], a["c_crossattn"]]),
        y=jnp.concatenate([a["uc_vector"], a["c_vector"]]), image_only_indicator=jnp.zeros((2, t))))(
        params["model"])
    assert_close(out, nhwc(a["unet_output_nchw"]), "VideoUNet")


def test_whole_trajectory_and_decode_match_the_seeds(tiny_svd):
    a, pipeline = tiny_svd["arrays"], tiny_svd["pipeline"]
    spec = video_spec(pipeline, REQUEST["num_frames"])
    assert (spec.name, spec.steps, spec.guider) == ("euler_edm", 3, "LinearPredictionGuider")
    run = jax.jit(lambda p, r, noise: video_from_noise(
        pipeline.engine, spec, p, noise=noise, scale=jnp.float32(pipeline.defaults.cfg_scale),
        key=jax.random.key(0), decoding_t=REQUEST["decoding_t"], **r))
    z, frames = run(pipeline.params, _request(a), jnp.asarray(nhwc(a["randn_nchw"])))
    assert_close(z, nhwc(a["samples_z_nchw"]), "sampled latents (3 guided Euler steps)")
    assert_close(frames, nhwc(a["samples_x_nchw"]), "decoded frames (VideoDecoder, chunks of 2)")


# ---------------------------------------------------------------------------------------
# The released files' layouts: every key and shape of svd_xt.safetensors / svd_xt_image_decoder.safetensors
# (svd.safetensors / svd_image_decoder.safetensors: the same engines), as the seed's DiffusionEngine
# holds them, converted by configs/inference/svd*.py from shapes alone.

MANIFEST = FIXTURES.parent / "svd_manifest.json"
# Tensors of the seed's modules that SVD never runs: OpenCLIP's text side (the seed deletes only the
# text transformer) and the frame encoder's decoder and post-quant conv (it only encodes).
NEVER_RUN = ("conditioner.embedders.0.open_clip.model.", "conditioner.embedders.3.encoder.decoder.",
             "conditioner.embedders.3.encoder.post_quant_conv.")


def released_header(image_decoder: bool) -> dict[str, np.ndarray]:
    """{key: a zero-strided array of the key's shape}: what the converter reads of a file's header."""
    manifest = json.loads(MANIFEST.read_text())
    keys = manifest["keys"]
    if image_decoder:
        keys = {**{k: v for k, v in keys.items() if not k.startswith("first_stage_model.")},
                **manifest["image_decoder_first_stage_keys"]}
    assert manifest["dtype"] == "float32"
    return {k: np.broadcast_to(np.float32(0), tuple(shape)) for k, shape in keys.items()}


@pytest.mark.parametrize("name, image_decoder, num_params", [("inference/svd_xt", False, 2_389_819_785),
                                                             ("inference/svd_xt_image_decoder", True, 2_375_730_873)])
def test_released_layouts_match_the_configs(name, image_decoder, num_params):
    header = released_header(image_decoder)
    assert sum(int(np.prod(a.shape)) for a in header.values()) == num_params  # 9.56 GB in float32
    config = load_config(name)
    parts = engine_parts(config, header.keys())
    validate_checkpoint(header, parts)  # nothing missing, unexpected or mis-shaped
    consumed = {k for part in parts for k in part.keys()}
    unused = sorted(set(header) - consumed)
    text_side = [k for k in unused if k.startswith(NEVER_RUN[0]) and ".visual." not in k]
    assert len(text_side) == 6 and all(k.startswith(NEVER_RUN) for k in unused), unused[:5]
    assert not any(k.startswith("conditioner.embedders.0.open_clip.model.visual.") for k in unused)
    assert {p.name for p in parts} >= {"model", "first_stage", "conditioner.embedders_0", "conditioner.embedders_3"}
    converted = sum(int(np.prod(header[k].shape)) for k in consumed)
    assert converted == {False: 2_288_606_321, True: 2_274_517_409}[image_decoder], converted


def test_svd_and_svd_xt_share_one_layout():
    """svd.yaml and svd_xt.yaml (and their image-decoder twins) differ in the sampler only."""
    for a, b in (("inference/svd", "inference/svd_xt"), ("inference/svd_image_decoder", "inference/svd_xt_image_decoder")):
        ma, mb = load_config(a).model.to_dict(), load_config(b).model.to_dict()
        ma["params"].pop("sampler_config"), mb["params"].pop("sampler_config")
        assert ma == mb, (a, b)
