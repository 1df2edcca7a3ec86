"""Stable Video Diffusion through the DiffusionEngine: the VideoUNet gets image_only_indicator
from the conditioning (doubled with the batch by the guiders), and the first stage encodes /
decodes in chunks of en_and_decode_n_samples_a_time frames (SVD's decoding_t), each chunk one
clip, as the seed's DiffusionEngine.decode_first_stage loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.diffusion import discretization as disc
from sgm_jax.diffusion import samplers as smp
from sgm_jax.diffusion.guiders import LinearPredictionGuider
from sgm_jax.engine import build_engine
from sgm_jax.inference.sampling import SamplerSpec
from sgm_jax.nn.vae import autoencoder_from_config
from sgm_jax.sampling_defaults import SamplingDefaults
from test_video_decoder import tiny_first_stage
from test_video_unet import TINY, random_params

SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.VScalingWithEDMcNoise"
VIDEOS, FRAMES, H, W = 1, 3, 8, 8


def tiny_svd_model(first_stage: dict | None = None, chunk: int | None = None) -> dict:
    """configs/inference/svd.yaml's model.params layout at toy size (no embedders: the test gives cond)."""
    params = {
        "network_config": {"target": "sgm.modules.diffusionmodules.video_model.VideoUNet", "params": TINY},
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.Denoiser",
                            "params": {"scaling_config": {"target": SCALING}}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": []}},
        "first_stage_config": first_stage or {"target": "sgm.models.autoencoder.IdentityFirstStage"},
        "scale_factor": 0.18215,
    }
    if chunk is not None:
        params["en_and_decode_n_samples_a_time"] = chunk
    params["sampler_config"] = {  # configs/inference/svd.yaml's sampler, guider at toy length
        "target": "sgm.modules.diffusionmodules.sampling.EulerEDMSampler", "params": {
            "num_steps": 1, "discretization_config": {
                "target": "sgm.modules.diffusionmodules.discretizer.EDMDiscretization",
                "params": {"sigma_min": 0.002, "sigma_max": 700.0}},
            "guider_config": {"target": "sgm.modules.diffusionmodules.guiders.LinearPredictionGuider",
                              "params": {"max_scale": 2.5, "min_scale": 1.0, "num_frames": FRAMES}}}}
    return {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}


def video_cond(seed: int) -> dict[str, jax.Array]:
    """What SVD's embedders give per frame: crossattn (the image embedding), vector (fps / motion /
    cond_aug), concat (the conditioning frame's latents), plus image_only_indicator [B, T]."""
    r = np.random.default_rng(seed)
    bt = VIDEOS * FRAMES
    return {"crossattn": jnp.asarray(r.normal(size=(bt, 1, TINY["context_dim"])), jnp.float32),
            "vector": jnp.asarray(r.normal(size=(bt, TINY["adm_in_channels"])), jnp.float32),
            "concat": jnp.asarray(r.normal(size=(bt, H, W, 4)), jnp.float32),
            "image_only_indicator": jnp.zeros((VIDEOS, FRAMES))}


def network_params(engine) -> dict:
    x = jnp.zeros((FRAMES, H, W, TINY["in_channels"]))
    abstract = jax.eval_shape(lambda: engine.network.init(
        jax.random.key(0), x, jnp.zeros((FRAMES,)), context=jnp.zeros((FRAMES, 1, TINY["context_dim"])),
        y=jnp.zeros((FRAMES, TINY["adm_in_channels"])), image_only_indicator=jnp.zeros((1, FRAMES)))["params"])
    return random_params(abstract, seed=3)


def by_hand(engine, p, x, sigma, cond):
    """VScalingWithEDMcNoise around the VideoUNet, written out (the seed's Denoiser + OpenAIWrapper)."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 1 / (s**2 + 1), -s / jnp.sqrt(s**2 + 1), 1 / jnp.sqrt(s**2 + 1)
    inputs = jnp.concatenate([x * c_in, cond["concat"]], axis=-1)
    out = engine.network.apply({"params": p}, inputs, 0.25 * jnp.log(sigma), context=cond["crossattn"],
                               y=cond["vector"], image_only_indicator=cond["image_only_indicator"])
    return out * c_out + x * c_skip


def test_denoise_passes_the_video_inputs_to_the_video_unet():
    engine = build_engine(tiny_svd_model())
    p = network_params(engine)
    cond = video_cond(0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(FRAMES, H, W, 4)), jnp.float32)
    sigma = jnp.full((FRAMES,), 1.7)
    denoise = jax.jit(lambda c: engine.denoise({"model": p}, x, sigma, c))
    got = denoise(cond)
    want = jax.jit(lambda c: by_hand(engine, p, x, sigma, c))(cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # an indicator marking the frames as still images changes the learned merge (spatial path only)
    still = {**cond, "image_only_indicator": jnp.ones((VIDEOS, FRAMES))}
    assert float(jnp.abs(denoise(still) - got).max()) > 1e-4


def test_one_guided_euler_step_doubles_the_indicator_with_the_batch():
    """EulerEDMSampler with one step from sigma_max returns D(x * sqrt(1 + sigma_0^2), sigma_0):
    the LinearPredictionGuider's per-frame CFG over [uc; c], whose image_only_indicator is [2B, T]."""
    engine = build_engine(tiny_svd_model())
    p = network_params(engine)
    cond, uc = video_cond(0), video_cond(1)
    guider = LinearPredictionGuider(max_scale=2.5, num_frames=FRAMES, min_scale=1.0,
                                    additional_cond_keys=["image_only_indicator"])
    schedule = disc.EDMDiscretization(sigma_min=0.002, sigma_max=700.0)
    sampler = smp.EulerEDMSampler(num_steps=1, discretization=schedule, guider=guider)
    noise = jnp.asarray(np.random.default_rng(2).normal(size=(FRAMES, H, W, 4)), jnp.float32)
    got = jax.jit(lambda n: sampler(lambda x, s, c: engine.denoise({"model": p}, x, s, c), n, cond, uc=uc))(noise)
    # the same through sample.py's spec, built from the model's own sampler (a traced max_scale)
    defaults = SamplingDefaults.for_trained(engine, (H, W, 3))
    assert (defaults.guider, dict(defaults.guider_options), defaults.cfg_scale) == (
        "LinearPredictionGuider", {"min_scale": 1.0, "num_frames": FRAMES, "additional_cond_keys": ()}, 2.5)
    spec = SamplerSpec.create("euler_edm", 1, engine.sampler.discretization, guider=defaults.guider,
                              guider_options=dict(defaults.guider_options))
    by_spec = jax.jit(lambda n, scale: spec.build(scale)(lambda x, s, c: engine.denoise({"model": p}, x, s, c), n,
                                                         cond, uc=uc))(noise, 2.5)
    np.testing.assert_allclose(np.asarray(by_spec), np.asarray(got), rtol=1e-6, atol=1e-6)

    s0 = float(schedule(1)[0])
    x = noise * np.sqrt(1 + s0**2)
    both = {k: jnp.concatenate([uc[k], cond[k]]) for k in cond}
    doubled = jax.jit(lambda xx, c: by_hand(engine, p, xx, jnp.full((2 * FRAMES,), s0), c))
    d_u, d_c = jnp.split(doubled(jnp.concatenate([x, x]), both), 2)
    scale = np.linspace(1.0, 2.5, FRAMES).reshape(-1, 1, 1, 1)
    want = np.asarray(d_u + scale * (d_c - d_u))
    # float32 at sigma 700, jitted vs eager: agreement to 1e-3 of the output's scale (a wiring error is O(1))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert np.abs(np.asarray(got) - (d_u + 2.5 * (d_c - d_u))).max() > 1e-2 * np.abs(want).max()  # per-frame


def test_first_stage_decodes_in_chunks_of_decoding_t_frames_each_one_clip():
    cfg = tiny_first_stage()
    engine = build_engine(tiny_svd_model(cfg, chunk=2))
    vae = autoencoder_from_config(cfg)
    z = jnp.asarray(np.random.default_rng(4).normal(size=(5, 4, 4, 4)), jnp.float32)
    vae_params = random_params(jax.eval_shape(lambda: vae.init(jax.random.key(0), z, method="decode")["params"]),
                               seed=5)
    params = {"first_stage": vae_params}
    got = np.asarray(jax.jit(engine.decode_first_stage)(params, z))
    scaled = z / 0.18215
    decode = jax.jit(lambda zs: vae.apply({"params": vae_params}, zs, method="decode"))
    want = np.concatenate([np.asarray(decode(scaled[i:i + 2])) for i in (0, 2, 4)])
    assert got.shape == (5, 8, 8, 3)  # two levels: a factor of 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # one 5-frame clip mixes over time differently: the chunks are real
    whole = np.asarray(decode(scaled))
    assert np.abs(whole - got).max() > 1e-4
    # the two whole chunks run one after another (a scan: one chunk's temporaries live at a time), the
    # shorter last one after them
    jaxpr = jax.make_jaxpr(engine.decode_first_stage)(params, z).jaxpr
    loops = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(loops) == 1 and loops[0].params["length"] == 2


CHUNKS_ON_A_MESH = """
import json
import jax, jax.numpy as jnp, numpy as np
from sgm_jax import mesh_context, parallel
from sgm_jax.nn.layers import in_chunks
mesh = parallel.make_mesh(devices=jax.devices())
x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
fn = lambda xs: in_chunks(lambda c: c - c.mean(0), xs, 2)  # chunk-dependent: the chunks are visible
loops = lambda f: [e.primitive.name for e in jax.make_jaxpr(f)(x).jaxpr.eqns].count("scan")
want = np.concatenate([np.asarray(x[i:i + 2] - x[i:i + 2].mean(0)) for i in range(0, 8, 2)])
on_mesh = mesh_context.traced_on(mesh, fn)
sharded = jax.device_put(x, parallel.batch_sharding(mesh))
print(json.dumps({"alone": loops(fn), "on_mesh": loops(on_mesh), "devices": mesh.size,
                  "err": [float(np.abs(np.asarray(jax.jit(f)(a)) - want).max()) for f, a in ((fn, x), (on_mesh, sharded))]}))
"""


def test_chunks_loop_only_where_the_batch_is_not_split_over_devices():
    """in_chunks runs its chunks in a lax.map on one device; traced for a mesh of 4 simulated CPU devices
    that splits the batch, the unrolled calls (a loop over a sharded batch's rows would idle the others);
    the seed's chunks either way."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHUNKS_ON_A_MESH], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4 and r["alone"] == 1 and r["on_mesh"] == 0 and max(r["err"]) < 1e-6, r
