"""UNetModel: parity with the seed's PyTorch outputs, config variants, conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.convert.common import CheckpointMismatchError, flatten_params
from sgm_jax.convert.unet import (
    UNET_PREFIX,
    convert_unet,
    export_unet,
    make_unet,
    unet_abstract_params,
    unet_key_map,
)
from sgm_jax.nn.unet import UNetModel

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "unet"

# Smallest UNet that still has every block type: two levels, attention at the second.
TINY = dict(
    in_channels=3, out_channels=5, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    attention_resolutions=(2,), num_head_channels=16, context_dim=24,
)


def random_params(abstract: Any, seed: int = 0, scale: float = 0.1) -> Any:
    """Random numpy params shaped like `abstract` (no jit'd init: its compile is slow on CPU).

    Every param is random, so zero-initialised output layers cannot hide errors."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (rng.standard_normal(a.shape) * scale).astype(np.float32), abstract
    )


def forward_shape(model: UNetModel, batch: int = 2, size: int = 8) -> tuple[Any, Any]:
    """(output ShapeDtypeStruct, abstract params) without computing anything."""
    inputs = model.example_inputs(batch=batch, size=size)
    out, variables = jax.eval_shape(lambda k: model.init_with_output(k, **inputs), jax.random.key(0))
    return out, variables["params"]


# ---------------------------------------------------------------------------------------
# (1) parity with the seed's outputs


@pytest.mark.parametrize("name", ["mnist_cond", "sdxl_tiny"])
def test_fixture_parity(name: str) -> None:
    paths = [FIXTURES / f"{name}.{ext}" for ext in ("json", "safetensors", "npz")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"reference fixtures not present: {missing}")
    from safetensors.numpy import load_file

    kwargs = json.loads(paths[0].read_text())
    state_dict = load_file(str(paths[1]))
    data = dict(np.load(paths[2]))
    params = convert_unet(state_dict, kwargs)
    model = make_unet(kwargs)
    x = data["x_nchw"].transpose(0, 2, 3, 1)
    # Full float32 matmuls/convs: GPUs would otherwise use TF32 (about 1e-3 relative).
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)(
            {"params": params}, x, data["timesteps"], context=data.get("context"), y=data.get("y")
        )
    ref = data["output_nchw"].transpose(0, 2, 3, 1)
    chex.assert_shape(out, ref.shape)
    rel = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"{name}: max relative error {rel:.3e}")
    assert rel <= 1e-4, rel

    # Export gives back the fixture's state dict bit for bit.
    exported = export_unet(params)
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------
# (2) config variants: shapes only (jax.eval_shape, nothing is computed)

VARIANTS = {
    "int_classes": dict(num_classes=10),
    "sequential_adm": dict(num_classes="sequential", adm_in_channels=12),
    "continuous": dict(num_classes="continuous"),
    "timestep_classes": dict(num_classes="timestep"),
    "no_classes_no_context": dict(context_dim=None),
    "linear_proj": dict(use_linear_in_transformer=True),
    "per_level_depth": dict(attention_resolutions=(1, 2), transformer_depth=(1, 3), transformer_depth_middle=2),
    "num_heads": dict(num_head_channels=-1, num_heads=4),
    "resblock_updown": dict(resblock_updown=True),
    "scale_shift": dict(use_scale_shift_norm=True),
    "pool_resample": dict(conv_resample=False),
    "attention_blocks": dict(attention_resolutions=(1, 2), num_attention_blocks=(0, 1), num_res_blocks=(1, 2)),
    "context_list": dict(context_dim=[24, 24], transformer_depth=2, disable_self_attentions=(False, True)),
    "no_middle_transformer": dict(disable_middle_transformer=True),
    "bf16": dict(dtype=jnp.bfloat16),
    "legacy_heads": dict(num_head_channels=24, legacy=True),
    "nonlegacy_heads": dict(num_head_channels=24),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_shapes(name: str) -> None:
    model = UNetModel(**{**TINY, **VARIANTS[name]})
    out, params = forward_shape(model, batch=2, size=8)
    chex.assert_shape(out, (2, 8, 8, 5))
    chex.assert_type(out, jnp.bfloat16 if name == "bf16" else jnp.float32)
    flat = flatten_params(params)
    # Params stay float32 whatever the compute dtype.
    assert all(v.dtype == jnp.float32 for v in flat.values())
    keys = {torch_key for torch_key, _ in unet_key_map(params).values()}
    assert len(keys) == len(flat)  # one torch tensor per Flax param

    if name == "int_classes":
        assert flat[("label_emb", "embedding")].shape == (10, 128)
    if name == "sequential_adm":
        assert flat[("label_emb_0", "0", "kernel")].shape == (12, 128)
        assert "label_emb.0.2.weight" in keys
    if name == "continuous":
        assert flat[("label_emb", "kernel")].shape == (1, 128)
    if name == "timestep_classes":
        assert "label_emb.1.0.weight" in keys
    if name in ("int_classes", "linear_proj"):  # conv 1x1 vs linear projections
        ndim = 2 if name == "linear_proj" else 4
        assert flat[("input_blocks_3", "1", "proj_in", "kernel")].ndim == ndim
        assert flat[("input_blocks_3", "1", "proj_out", "kernel")].ndim == ndim
    if name == "no_classes_no_context":
        assert not any(k.startswith("label_emb") for k in keys)
        # attn2 falls back to self-attention: keys come from the 64-wide tokens.
        assert flat[("middle_block", "1", "transformer_blocks_0", "attn2", "to_k", "kernel")].shape == (64, 64)
    if name == "per_level_depth":
        assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
        assert "input_blocks.3.1.transformer_blocks.2.ff.net.2.weight" in keys
        assert "input_blocks.3.1.transformer_blocks.3.ff.net.2.weight" not in keys
        assert "middle_block.1.transformer_blocks.1.norm3.weight" in keys
        assert "middle_block.1.transformer_blocks.2.norm3.weight" not in keys
    if name in ("num_heads", "int_classes"):
        assert flat[("input_blocks_3", "1", "transformer_blocks_0", "attn1", "to_q", "kernel")].shape == (64, 64)
    if name.endswith("legacy_heads"):
        # 64 channels, 24 per head -> 2 heads; legacy: dim_head = 64 // 2, else 24.
        width = 64 if name == "legacy_heads" else 48
        assert flat[("input_blocks_3", "1", "transformer_blocks_0", "attn1", "to_q", "kernel")].shape == (width, width)
    if name == "resblock_updown":
        assert "input_blocks.2.0.in_layers.2.weight" in keys  # a down ResBlock, not Downsample
        assert "output_blocks.1.2.in_layers.2.weight" in keys  # an up ResBlock
        assert not any(k.endswith(".op.weight") or k.endswith(".conv.weight") for k in keys)
    if name == "scale_shift":
        assert flat[("input_blocks_1", "0", "emb_layers_1", "kernel")].shape == (128, 64)
    if name == "pool_resample":
        assert not any(k.endswith(".op.weight") or k.endswith(".conv.weight") for k in keys)
    if name == "attention_blocks":
        assert not any(k.startswith("input_blocks.1.1.") for k in keys)  # level 0: 0 blocks
        assert any(k.startswith("input_blocks.3.1.") for k in keys)
        assert not any(k.startswith("input_blocks.4.1.") for k in keys)  # only the first
    if name == "context_list":
        assert flat[("input_blocks_3", "1", "transformer_blocks_1", "attn2", "to_k", "kernel")].shape == (24, 64)
        # disable_self_attentions: attn1 attends to the context too.
        assert flat[("input_blocks_3", "1", "transformer_blocks_1", "attn1", "to_k", "kernel")].shape == (24, 64)
    if name == "no_middle_transformer":
        assert "middle_block.2.in_layers.0.weight" in keys  # the seed keeps index 2
        assert not any(k.startswith("middle_block.1.") for k in keys)


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        forward_shape(UNetModel(**{**TINY, "num_head_channels": -1}))
    with pytest.raises(NotImplementedError, match="AttentionBlock"):
        forward_shape(UNetModel(**{**TINY, "use_spatial_transformer": False}))
    with pytest.raises(ValueError, match="adm_in_channels"):
        forward_shape(UNetModel(**{**TINY, "num_classes": "sequential"}))
    model = UNetModel(**TINY)
    inputs = model.example_inputs(size=8)
    with pytest.raises(ValueError, match="context"):  # built for context_dim=24
        jax.eval_shape(lambda k: model.init(k, inputs["x"], inputs["timesteps"]), jax.random.key(0))
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(lambda k: model.init(k, **inputs, y=jnp.zeros((1,), jnp.int32)), jax.random.key(0))


# ---------------------------------------------------------------------------------------
# (2b) numerics that need computing: remat and bf16 on the tiny config


@pytest.fixture(scope="module")
def tiny_setup() -> tuple[dict, dict, dict]:
    # One level, no res blocks beyond the middle and the one output block: cheap to compile.
    kwargs = {**TINY, "channel_mult": (1,), "num_res_blocks": 0, "attention_resolutions": (1,),
              "num_classes": 10, "use_scale_shift_norm": True}
    _, abstract = forward_shape(UNetModel(**kwargs))
    rng = np.random.default_rng(1)
    inputs = {
        "x": rng.standard_normal((2, 4, 4, 3)).astype(np.float32),
        "timesteps": np.array([3.0, 700.0], np.float32),
        "context": rng.standard_normal((2, 5, 24)).astype(np.float32),
        "y": np.array([1, 7], np.int32),
    }
    return kwargs, random_params(abstract), inputs


def test_checkpoint_same_output(tiny_setup) -> None:
    """use_checkpoint (nn.remat) changes memory, not values: same output, dropout included.

    Only the forward pass is compared: compiling backward passes is slow on small CPUs, and
    remat's gradients are JAX's own guarantee."""
    kwargs, params, inputs = tiny_setup
    outs = []
    for use_checkpoint in (False, True):
        model = UNetModel(**{**kwargs, "dropout": 0.3}, use_checkpoint=use_checkpoint)
        apply = jax.jit(lambda p, k: model.apply({"params": p}, **inputs, deterministic=False,
                                                  rngs={"dropout": k}))
        outs.append(apply(params, jax.random.key(7)))
    chex.assert_trees_all_equal(outs[0], outs[1])


def test_remat_policy_is_passed_to_every_block(tiny_setup) -> None:
    """remat_policy names the jax.checkpoint_policies policy of each rematerialised block; the values
    stay the forward pass's (compared without compiling a backward pass, as above)."""
    kwargs, params, inputs = tiny_setup
    plain = UNetModel(**kwargs)
    model = UNetModel(**kwargs, use_checkpoint=True, remat_policy="dots_with_no_batch_dims_saveable")
    outs = [jax.jit(lambda p, m=m: m.apply({"params": p}, **inputs))(params) for m in (plain, model)]
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-6)
    loss = lambda p: model.apply({"params": p}, **inputs).sum()  # noqa: E731
    eqns = [e for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns if "policy" in e.params]
    assert len(eqns) >= 3  # the res blocks and the transformer block
    assert {e.params["policy"] for e in eqns} == {jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    with pytest.raises(ValueError, match="is not one of nothing_saveable"):
        jax.eval_shape(lambda: UNetModel(**kwargs, use_checkpoint=True, remat_policy="dots").init(
            jax.random.key(0), **inputs))
    with pytest.raises(ValueError, match="needs use_checkpoint=True"):
        UNetModel(**kwargs, remat_policy="dots_saveable").build_plan()


def test_bf16_close_to_f32(tiny_setup) -> None:
    kwargs, params, inputs = tiny_setup
    out32 = jax.jit(UNetModel(**kwargs).apply)({"params": params}, **inputs)
    out16 = jax.jit(UNetModel(**kwargs, dtype=jnp.bfloat16).apply)({"params": params}, **inputs)
    chex.assert_type(out16, jnp.bfloat16)
    rel = float(jnp.abs(out16.astype(jnp.float32) - out32).max() / jnp.abs(out32).max())
    assert rel < 5e-2, rel


# ---------------------------------------------------------------------------------------
# (3) conversion: round trip and validation errors


def test_export_convert_round_trip(tiny_setup) -> None:
    kwargs, params, _ = tiny_setup
    state_dict = export_unet(params)
    assert all(k.startswith(UNET_PREFIX) for k in state_dict)
    assert state_dict[UNET_PREFIX + "input_blocks.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict[UNET_PREFIX + "time_embed.0.weight"].shape == (128, 32)
    back = convert_unet(state_dict, kwargs)
    chex.assert_trees_all_equal(back, params)  # bit-exact


def test_mismatched_checkpoint_errors(tiny_setup) -> None:
    kwargs, params, _ = tiny_setup
    state_dict = export_unet(params)
    gone = UNET_PREFIX + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"
    broken = {k: v for k, v in state_dict.items() if k != gone}
    with pytest.raises(CheckpointMismatchError, match="missing keys.*" + gone.replace(".", r"\.")):
        convert_unet(broken, kwargs)

    bad = UNET_PREFIX + "middle_block.0.in_layers.2.weight"
    misshaped = {**state_dict, bad: np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys.*" + bad.replace(".", r"\.")):
        convert_unet(misshaped, kwargs)

    extra = UNET_PREFIX + "output_blocks.1.0.in_layers.0.weight"
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*" + extra.replace(".", r"\.")):
        convert_unet({**state_dict, extra: np.zeros((3,), np.float32)}, kwargs)

    # Keys of other networks in a full checkpoint are not "unexpected".
    convert_unet({**state_dict, "first_stage_model.decoder.conv_in.weight": np.zeros(1)}, kwargs)


# ---------------------------------------------------------------------------------------
# full-size sanity check, abstract only

SDXL_BASE = dict(
    adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4,
    out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
    channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
    transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax-xformers",
)


def test_sdxl_base_param_count_and_key_map() -> None:
    # transformer_depth[0] is irrelevant: level 0 (ds=1) has no attention in SDXL.
    # use_checkpoint=False: same params, quicker to trace.
    kwargs = {**SDXL_BASE, "transformer_depth": [0, 2, 10], "use_checkpoint": False}
    abstract = unet_abstract_params(make_unet(kwargs))
    flat = flatten_params(abstract)
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 2_567_463_684
    key_map = unet_key_map(abstract)
    assert set(key_map) == set(flat)
    torch_keys = {k for k, _ in key_map.values()}
    assert len(torch_keys) == len(flat) == 1680
    for key in (
        "label_emb.0.0.weight", "time_embed.2.bias", "out.2.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
        "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight",
        "input_blocks.3.0.op.weight",
    ):
        assert key in torch_keys, key
    path = ("input_blocks_4", "1", "transformer_blocks_1", "attn2", "to_k", "kernel")
    assert flat[path].shape == (2048, 640)


def test_attention_past_its_logit_budget_runs_in_query_chunks():
    """Past SCORE_BUDGET_BYTES of float32 logits the queries go in chunks (each row still sees every
    key): the same outputs and gradients, and no full-size logits in the computation."""
    from sgm_jax.nn.attention import attention, query_chunk

    assert query_chunk(2 * 25 * 5, 9216, 9216) == 192  # SVD-XT's top level, [uc; c] x 25 frames: 48 chunks
    assert query_chunk(2 * 10, 4096, 4096) == 4096  # SDXL's 64x64 level at batch 2 fits at once
    assert query_chunk(1, 7, 10**12) == 1
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 3, 8)), jnp.float32) for t in (96, 40, 40))
    budget = 4 * 2 * 3 * 40 * 32  # 32 query rows at a time
    for impl in (None, "tpu"):
        np.testing.assert_allclose(attention(q, k, v, impl, budget=budget), attention(q, k, v, impl),
                                   atol=1e-6, rtol=1e-6)
    loss = lambda budget: lambda *a: (attention(*a, budget=budget) ** 2).sum()  # noqa: E731
    for got, want in zip(jax.grad(loss(budget), (0, 1, 2))(q, k, v), jax.grad(loss(2**31), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, budget=budget))(q, k, v))
    assert "32,40]" in jaxpr and "96,40]" not in jaxpr


def test_the_splash_kernel_is_softmax_attention():
    """attn_implementation="splash" (jax's Pallas flash-attention kernel, in Pallas's interpret mode on CPU)
    against jax.nn.dot_product_attention in float32, outputs and gradients; lengths its blocks do not tile
    (a 77-token context) take the "tpu" form; None is jax.nn's, exactly."""
    from sgm_jax.nn.attention import attention, splash_fits

    assert splash_fits(4096, 4096) and splash_fits(256, 128) and not splash_fits(4096, 77)
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 64)) * s, jnp.float32) for t, s in ((256, 2.0), (128, 2.0),
                                                                                         (128, 1.0)))
    np.testing.assert_allclose(attention(q, k, v, "splash"), jax.nn.dot_product_attention(q, k, v), atol=1e-5)
    loss = lambda impl: lambda *a: (attention(*a, impl) ** 2).sum()  # noqa: E731
    for got, want in zip(jax.grad(loss("splash"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())
    ctx = jnp.asarray(rng.normal(size=(2, 77, 2, 64)), jnp.float32)
    np.testing.assert_allclose(attention(q, ctx, ctx, "splash"), jax.nn.dot_product_attention(q, ctx, ctx),
                               atol=1e-5)
    np.testing.assert_array_equal(jax.jit(attention)(q, k, v), jax.jit(jax.nn.dot_product_attention)(q, k, v))


SPLASH_ON_A_MESH = """
import json, jax, jax.numpy as jnp, numpy as np
from sgm_jax import mesh_context, parallel
from sgm_jax.nn.attention import attention
mesh = parallel.make_mesh(2, 2)
rng = np.random.default_rng(3)
q, k, v = (jnp.asarray(rng.normal(size=(4, 128, 2, 32)) * s, jnp.float32) for s in (2.0, 2.0, 1.0))
loss = lambda impl: lambda *a: (attention(*a, impl) ** 2).sum()
want = jax.value_and_grad(loss("xla"), (0, 1, 2))(q, k, v)
put = lambda x: jax.device_put(x, parallel.batch_sharding(mesh))
fn = mesh_context.traced_on(mesh, jax.value_and_grad(loss("splash"), (0, 1, 2)))
got = jax.jit(fn)(put(q), put(k), put(v))
err = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
jaxpr = lambda impl, n: str(jax.make_jaxpr(mesh_context.traced_on(mesh, loss(impl)))(q[:n], k[:n], v[:n]))
budget = 4 * 1 * 2 * 128 * 128  # float32 logits of one device's row: the 4 rows at once would pass it
chunked = lambda f: "scan" in str(jax.make_jaxpr(f(lambda *a: attention(*a, "xla", budget=budget)))(q, k, v))
print(json.dumps({"err": err, "sharded": "shard_map" in jaxpr("splash", 4), "default": "shard_map" in jaxpr(None, 4),
                  "indivisible": "shard_map" in jaxpr("splash", 2), "chunked_on_one": chunked(lambda f: f),
                  "chunked_per_device": chunked(lambda f: mesh_context.traced_on(mesh, f))}))
"""


def test_the_splash_kernel_runs_per_batch_shard_on_a_mesh():
    """On a 2x2 mesh (4 simulated CPU devices) "splash" runs the kernel once per device's rows (a shard_map):
    loss and gradients equal jax.nn's on one device; a batch of 2 over 4 devices takes the non-kernel form;
    the default (None) picks the kernel only for TPU meshes (tests/test_compile_check.py), not CPU ones; the
    logits budget of the non-kernel forms counts one device's rows."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SPLASH_ON_A_MESH], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(r["err"]) < 1e-5, r
    assert r["sharded"] and not r["default"] and not r["indivisible"], r
    assert r["chunked_on_one"] and not r["chunked_per_device"], r  # the logits budget is per device


def test_the_tpu_attention_form_is_softmax_attention():
    """attn_implementation="tpu" (normalised after the PV matmul) against jax.nn.dot_product_attention in
    float32, and against a float64 softmax in bfloat16, at a large logit scale."""
    from sgm_jax.nn.attention import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 37, 3, 16)) * s for s in (3.0, 3.0, 1.0))  # logit std ~ 9
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    np.testing.assert_allclose(attention(*f32, "tpu"), jax.nn.dot_product_attention(*f32), atol=2e-5, rtol=1e-5)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / 4.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    exact = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    err = lambda out: float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2)))  # noqa: E731
    assert err(attention(*bf16, "tpu")) < 2 * err(jax.nn.dot_product_attention(*bf16)) + 1e-3
