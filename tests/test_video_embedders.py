"""SVD's image conditioning embedders: the seed's kornia resize (against kornia 0.6.9, the seed's
pin, when installed with torch), the OpenCLIP image embedding per video, the conditioning frame's
latents, and the whole conditioner of configs/inference/svd.yaml at toy size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.nn.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionTower
from sgm_jax.nn.conditioner import build_conditioner
from sgm_jax.nn.vae import autoencoder_from_config
from sgm_jax.nn.video_embedders import (
    FrozenOpenCLIPImagePredictionEmbedder,
    VideoPredictionEmbedderWithEncoder,
    kornia_resize,
)

TOWER = dict(image_size=28, patch_size=14, width=32, layers=2, heads=2, embed_dim=16, act="gelu")
MODULES = "sgm.modules.encoders.modules."


def tiny_encoder_config() -> dict:
    """svd.yaml's AutoencoderKLModeOnly at toy size (one downsampling)."""
    return {"target": "sgm.models.autoencoder.AutoencoderKLModeOnly", "params": {
        "embed_dim": 4, "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4,
                                     "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
                                     "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}


def svd_emb_models() -> list[dict]:
    """configs/inference/svd.yaml's emb_models, the towers at toy size."""
    clip = {"target": MODULES + "FrozenOpenCLIPImageEmbedder", "params": {"freeze": True, "tower": TOWER}}
    return [
        {"is_trainable": False, "input_key": "cond_frames_without_noise",
         "target": MODULES + "FrozenOpenCLIPImagePredictionEmbedder",
         "params": {"n_cond_frames": 1, "n_copies": 1, "open_clip_embedding_config": clip}},
        {"input_key": "fps_id", "is_trainable": False, "target": MODULES + "ConcatTimestepEmbedderND",
         "params": {"outdim": 8}},
        {"input_key": "motion_bucket_id", "is_trainable": False, "target": MODULES + "ConcatTimestepEmbedderND",
         "params": {"outdim": 8}},
        {"input_key": "cond_frames", "is_trainable": False, "target": MODULES + "VideoPredictionEmbedderWithEncoder",
         "params": {"disable_encoder_autocast": True, "n_cond_frames": 1, "n_copies": 1, "is_ae": True,
                    "encoder_config": tiny_encoder_config()}},
        {"input_key": "cond_aug", "is_trainable": False, "target": MODULES + "ConcatTimestepEmbedderND",
         "params": {"outdim": 8}},
    ]


@pytest.mark.parametrize("hw,size", [((576, 1024), (224, 224)), ((40, 30), (28, 28)), ((20, 20), (28, 28))],
                         ids=["svd_xt_frame", "down", "up"])
def test_resize_is_the_seeds_kornia_resize(hw, size):
    torch = pytest.importorskip("torch")
    kornia = pytest.importorskip("kornia")
    x = np.random.default_rng(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    want = kornia.geometry.resize(torch.from_numpy(x).permute(0, 3, 1, 2), size, interpolation="bicubic",
                                  align_corners=True, antialias=True).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda a: kornia_resize(a, size))(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_resize_keeps_constants_and_samples_the_corners():
    """Without torch: a linear map whose rows sum to one (constant images stay), and with
    align_corners=True and no blur the corner pixels are sampled exactly."""
    x = np.random.default_rng(1).uniform(-1, 1, (1, 9, 13, 3)).astype(np.float32)
    const = np.full_like(x, 0.3)
    np.testing.assert_allclose(np.asarray(kornia_resize(const, (5, 7))), 0.3, atol=1e-6)
    up = np.asarray(kornia_resize(x, (17, 25), antialias=False))
    np.testing.assert_allclose(up[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], atol=1e-6)


def test_image_prediction_embedder_is_the_tower_on_the_resized_frame_per_video():
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (4, 40, 30, 3)), jnp.float32)
    clip = {"target": MODULES + "FrozenOpenCLIPImageEmbedder", "params": {"freeze": True, "tower": TOWER}}
    emb = FrozenOpenCLIPImagePredictionEmbedder(clip, n_cond_frames=2, n_copies=3)
    params = emb.init(jax.random.key(0), images)["params"]
    # the seed's conditioner.embedders.N.open_clip.model.visual.*
    assert set(params) == {"open_clip"} and set(params["open_clip"]) == {"visual"}
    out = emb.apply({"params": params}, images)
    pixels = ((kornia_resize(images, (28, 28)) + 1) / 2 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    z = CLIPVisionTower(**TOWER).apply({"params": params["open_clip"]["visual"]}, pixels)  # [4, 16]
    want = np.repeat(np.asarray(z).reshape(2, 2, 16), 3, axis=0)  # "(b t) d -> b t d" then "(b s) t d"
    assert out.shape == (6, 2, 16)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_frame_encoder_is_the_posterior_mode_repeated_and_chunked():
    frames = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
    cfg = tiny_encoder_config()
    emb = VideoPredictionEmbedderWithEncoder(n_cond_frames=1, n_copies=2, encoder_config=cfg, is_ae=True,
                                             scale_factor=0.5, en_and_decode_n_samples_a_time=2)
    params = emb.init(jax.random.key(0), frames)["params"]
    out = np.asarray(emb.apply({"params": params}, frames))
    vae = autoencoder_from_config(cfg)
    mean = vae.apply({"params": params["encoder"]}, frames, method="encode")[..., :4]  # moments: mean, logvar
    np.testing.assert_allclose(out, np.repeat(0.5 * np.asarray(mean), 2, axis=0), rtol=1e-5, atol=1e-5)
    assert out.shape == (6, 8, 8, 4)
    with pytest.raises(ValueError, match="sigma_sampler_config"):
        VideoPredictionEmbedderWithEncoder(1, 1, cfg, sigma_sampler_config={"target": "x"}, is_ae=True).init(
            jax.random.key(0), frames)


def test_svd_conditioner_outputs_crossattn_vector_and_concat():
    conditioner = build_conditioner(svd_emb_models())
    image = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    batch = {"cond_frames_without_noise": image, "cond_frames": image + 0.02, "fps_id": jnp.array([6.0]),
             "motion_bucket_id": jnp.array([127.0]), "cond_aug": jnp.array([0.02])}
    params = conditioner.init(jax.random.key(0), batch)["params"]
    out = conditioner.apply({"params": params}, batch)
    assert {k: v.shape for k, v in out.items()} == {"crossattn": (1, 1, 16), "vector": (1, 24),
                                                     "concat": (1, 8, 8, 4)}
    assert set(params) == {"embedders_0", "embedders_3"}  # the towers; the timestep embedders have none
