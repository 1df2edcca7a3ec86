"""LoRA: files in the kohya-ss and diffusers / peft layouts merged by the standard rule
(W + scale * alpha / r * up @ down, computed here in numpy on the seed-layout state dict, or
in PyTorch on transformers' CLIPTextModel), several at once, unmerged = merged, strictness,
the diffusers <-> seed UNet name map, and a tiny LoRA training run with kohya export."""

from __future__ import annotations

import hashlib
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from sgm_jax.configs.inference import sd_2_1, sd_xl_base, tiny_sd_2_1, tiny_sdxl
from sgm_jax.convert import checkpoint as ck
from sgm_jax.convert.common import flatten_params, unflatten_params
from sgm_jax.convert.layout import engine_parts
from sgm_jax.convert.unet import make_unet, unet_abstract_params, unet_key_map
from sgm_jax.errors import UserError
from sgm_jax.lora import (ATTENTION_TARGETS, CONV_TARGETS, LoraSet, LoraWarning, adapter_items, apply_loras,
                          export_kohya, init_adapters, load_adapters, merge_adapters, parse_lora_spec,
                          read_lora, seed_to_diffusers)

TOL = 1e-5
UNET = "model.diffusion_model."
CLIP = "conditioner.embedders.0.transformer.text_model."
OPENCLIP = "conditioner.embedders.1.model.transformer."

# tiny_sdxl modules (seed names) and their diffusers names, written out by hand from the
# UNet's block layout (num_res_blocks=2, attention at levels 1 and 2).
UNET_MODULES = {
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.8.1.transformer_blocks.1.attn2.to_k": "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
    "middle_block.1.transformer_blocks.0.attn2.to_out.0": "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "output_blocks.3.1.proj_in": "up_blocks.1.attentions.0.proj_in",
    "output_blocks.0.1.transformer_blocks.1.ff.net.0.proj": "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",                 # 3x3 conv (LoCon)
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",       # 1x1 conv
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
    "time_embed.0": "time_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
# transformers CLIPTextModel names (te1 = CLIP-L, te2 = the OpenCLIP tower) -> (seed key, fused rows)
TEXT_MODULES = {
    "te1": {"text_model.encoder.layers.0.self_attn.q_proj": (CLIP + "encoder.layers.0.self_attn.q_proj.weight", None),
            "text_model.encoder.layers.1.mlp.fc2": (CLIP + "encoder.layers.1.mlp.fc2.weight", None)},
    "te2": {"text_model.encoder.layers.0.self_attn.k_proj": (OPENCLIP + "resblocks.0.attn.in_proj_weight", 1),
            "text_model.encoder.layers.1.self_attn.v_proj": (OPENCLIP + "resblocks.1.attn.in_proj_weight", 2),
            "text_model.encoder.layers.1.self_attn.out_proj": (OPENCLIP + "resblocks.1.attn.out_proj.weight", None),
            "text_model.encoder.layers.0.mlp.fc1": (OPENCLIP + "resblocks.0.mlp.c_fc.weight", None)},
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_params(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return unflatten_params({p.params_path + path: (rng.standard_normal(shape) * 0.1).astype(np.float32)
                             for p in engine_parts(config) for path, shape in p.shapes.items()})


def random_factors(rng, weight_shape, rank: int, rows: int | None = None):
    """(down, up) in PyTorch layouts for a weight [out, in(, kh, kw)] (out = rows when fused)."""
    out = weight_shape[0] // 3 if rows is not None else weight_shape[0]
    down = rng.standard_normal((rank,) + tuple(weight_shape[1:])).astype(np.float32) * 0.3
    up = rng.standard_normal((out, rank) + (1, 1) * (len(weight_shape) == 4)).astype(np.float32) * 0.3
    return down, up


def rule(sd: dict, key: str, down, up, factor: float, rows: int | None = None) -> None:
    """The standard merge, in place, on a seed-layout state dict."""
    delta = factor * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
    w = sd[key]
    if rows is not None:
        n = w.shape[0] // 3
        w[rows * n:(rows + 1) * n] += delta.reshape(n, -1)
    else:
        w += delta.reshape(w.shape)


def build_file(path, layout: str, sd_shapes: dict, seed: int, expected: dict, scale: float):
    """A LoRA file with every module above, random factors, applied by `rule` to `expected`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    entries = [("unet", UNET + m + ".weight", None, m, d) for m, d in UNET_MODULES.items()]
    entries += [(c, key, rows, hf, hf) for c, mods in TEXT_MODULES.items() for hf, (key, rows) in mods.items()]
    for i, (component, key, rows, seed_name, diffusers_name) in enumerate(entries):
        rank = 2 + i % 3
        down, up = random_factors(rng, sd_shapes[key], rank, rows)
        # kohya: an .alpha per module; diffusers: the UNet's lora_alpha in the file's metadata
        alpha = float(rank) * (0.5 + i % 2) if layout == "kohya" else (3.0 if component == "unet" else None)
        if layout == "kohya":
            stem = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}[component] + seed_name.replace(".", "_")
            tensors.update({stem + ".lora_down.weight": down, stem + ".lora_up.weight": up,
                            stem + ".alpha": np.asarray(alpha, np.float32)})
        else:
            stem = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[component] + diffusers_name
            tensors.update({stem + ".lora_A.weight": down, stem + ".lora_B.weight": up})
        rule(expected, key, down, up, scale * (alpha if alpha is not None else rank) / rank, rows)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 3, "unet.r": 4})}
              if layout == "diffusers" else None)
    return path


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(config, params, {layout: file}, expected params for kohya x0.7 + diffusers x -0.4)."""
    root = tmp_path_factory.mktemp("lora")
    config = tiny_sdxl.get_config()
    params = random_params(config)
    sd = ck.export_checkpoint(params, config)
    shapes = {k: v.shape for k, v in sd.items()}
    files = {"kohya": build_file(root / "kohya.safetensors", "kohya", shapes, 1, sd, 0.7),
             "diffusers": build_file(root / "diffusers.safetensors", "diffusers", shapes, 2, sd, -0.4)}
    return config, params, files, ck.convert_checkpoint(sd, config)


def max_rel_err(got: dict, want: dict) -> float:
    fg, fw = flatten_params(got), flatten_params(want)
    assert fg.keys() == fw.keys()
    return max(rel_err(fg[p], fw[p]) for p in fw)


def test_two_layouts_at_once_match_the_rule(sdxl):
    config, params, files, expected = sdxl
    merged = apply_loras(params, [(files["kohya"], 0.7), (files["diffusers"], -0.4)])
    err = max_rel_err(merged, expected)
    print(f"kohya x0.7 + diffusers x-0.4 vs numpy rule: max relative error {err:.2e}")
    assert err <= TOL
    base = flatten_params(params)
    changed = [p for p, v in flatten_params(merged).items() if v is not base[p]]  # the rest is shared
    assert len(changed) == len(UNET_MODULES) + 2 + 4  # te2: layer 0 k + fc1, layer 1 v + out_proj


def test_each_layout_alone_and_unmerged_equals_merged(sdxl):
    config, params, files, _ = sdxl
    before = {p: v.copy() for p, v in flatten_params(params).items()}
    loras = LoraSet(params, [(files["kohya"], 0.7), (files["diffusers"], -0.4)])
    both = loras.merged()
    np.testing.assert_equal(flatten_params(both), flatten_params(apply_loras(
        params, [(files["kohya"], 0.7), (files["diffusers"], -0.4)])))
    # Each file alone = the two-file merge with the other's scale at zero.
    for i, name in enumerate(["kohya", "diffusers"]):
        scales = [0.0, 0.0]
        scales[i] = 1.3
        alone = apply_loras(params, [(files[name], 1.3)])
        assert max_rel_err(loras.merged(scales), alone) == 0.0
    assert max_rel_err(loras.merged([0.0, 0.0]), params) == 0.0
    assert max_rel_err(loras.merged([0.7, -0.4]), both) == 0.0
    assert all(np.array_equal(v, before[p]) for p, v in flatten_params(params).items())  # base untouched


def test_clip_lora_matches_transformers_forward(tmp_path):
    """kohya te1 LoRA merged into transformers' CLIPTextModel (PyTorch) vs ours."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sgm_jax.convert.text import convert_clip_l
    from sgm_jax.nn.text import FrozenCLIPEmbedder

    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    tower = convert_clip_l(sd, FrozenCLIPEmbedder(vocab_size=99, width=32, layers=2, heads=4, intermediate_size=64),
                           prefix="")
    params = {"conditioner": {"embedders_0": tower}}
    rng, tensors = np.random.default_rng(3), {}
    with torch.no_grad():
        for module in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            for layer in range(2):
                name = f"text_model.encoder.layers.{layer}.{module}"  # kohya's name (transformers 4.x)
                nested = hasattr(model, "text_model")  # transformers 5 dropped the level
                weight = model.get_submodule(name if nested else name[len("text_model."):]).weight
                down, up = random_factors(rng, tuple(weight.shape), 4)
                stem = "lora_te_" + name.replace(".", "_")
                tensors.update({stem + ".lora_down.weight": down, stem + ".lora_up.weight": up,
                                stem + ".alpha": np.asarray(2.0, np.float32)})
                weight += torch.from_numpy(0.8 * 2.0 / 4 * (up @ down))
        ids = np.full((2, 77), 98, np.int64)
        ids[0, :4], ids[1, :6] = [97, 5, 6, 98], [97, 10, 20, 30, 40, 98]
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    save_file(tensors, str(tmp_path / "te.safetensors"))
    merged = apply_loras(params, [(tmp_path / "te.safetensors", 0.8)])
    embedder = FrozenCLIPEmbedder(vocab_size=99, width=32, layers=2, heads=4, intermediate_size=64)
    with jax.default_matmul_precision("highest"):
        z = embedder.apply({"params": merged["conditioner"]["embedders_0"]}, jnp.asarray(ids, jnp.int32))
    err = rel_err(z, ref)
    print(f"CLIP text LoRA vs transformers: max relative error {err:.2e}")
    assert err <= TOL


def test_mismatches_are_one_line_or_a_counted_warning(sdxl, tmp_path):
    config, params, files, _ = sdxl
    rng = np.random.default_rng(0)
    good = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v.lora_down.weight": rng.random((2, 64), np.float32),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v.lora_up.weight": rng.random((64, 2), np.float32)}
    bad = {"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": np.ones((2, 64), np.float32),
           "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": np.ones((64, 2), np.float32),
           "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.ones((2, 65), np.float32),
           "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.ones((64, 2), np.float32),
           "lora_unet_out_2.hada_w1_a": np.ones((2, 2), np.float32)}
    save_file({**good, **bad}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError) as info:
        apply_loras(params, [(tmp_path / "mixed.safetensors", 1.0)])
    message = str(info.value)
    assert "\n" not in message
    for text in ("unknown keys (1): lora_unet_out_2.hada_w1_a", "matching no parameter (1): unet:input_blocks_99_1_proj_in",
                 "mis-shaped modules (1): unet:input_blocks_4_1_proj_in"):
        assert text in message, message
    with pytest.warns(LoraWarning, match="skipped 3 of 4 entries"):
        lenient = apply_loras(params, [(tmp_path / "mixed.safetensors", 1.0)], strict=False)
    save_file(good, str(tmp_path / "good.safetensors"))
    np.testing.assert_equal(flatten_params(lenient), flatten_params(apply_loras(params, [(tmp_path / "good.safetensors", 1.0)])))
    # An SDXL text-tower LoRA on SD 2.1 (one tower): te2 names match nothing there.
    params21 = random_params(tiny_sd_2_1.get_config())
    with pytest.raises(UserError, match=r"matching no parameter \(\d+\): te2:text_model_encoder_layers"):
        apply_loras(params21, [(files["kohya"], 1.0)])
    with pytest.raises(UserError, match="not found"):
        apply_loras(params, [(tmp_path / "absent.safetensors", 1.0)])
    assert parse_lora_spec("a/b:c.safetensors:0.5") == ("a/b:c.safetensors", 0.5)
    assert parse_lora_spec("x.safetensors") == ("x.safetensors", 1.0)


def test_loading_hook_merges_into_converted_weights(sdxl, tmp_path):
    from sgm_jax.inference.loading import SetupError, load_checkpoint

    config, params, files, expected = sdxl
    out = ck.save_params(params, tmp_path / "converted")
    loras = [(files["kohya"], 0.7), (files["diffusers"], -0.4)]
    assert max_rel_err(load_checkpoint(out, "tiny_sdxl.py", loras=loras), expected) <= TOL
    with pytest.raises(SetupError, match="LoRA file .* not found"):
        load_checkpoint(out, "tiny_sdxl.py", loras=[(tmp_path / "nope.safetensors", 1.0)])


# sha256 over the sorted "seed module<space>diffusers module" pairs that diffusers' own
# convert_ldm_unet_checkpoint (diffusers 0.42.1) produces for the full-size UNets (every module
# with a weight or bias), computed once with diffusers installed; ours must give the same map.
DIFFUSERS_MAP_DIGESTS = {
    "sd_xl_base": (1050, "ef1f5ed2968ead4ab317546c25437cfbf528b97253fac457f7b98756b856f73b"),
    "sd_2_1": (391, "ca6405260c06a9de6a1a0a1fc85169c6cd8111cbff4c3e6986d274e218f6d449"),
}


@pytest.mark.parametrize("name,module", [("sd_xl_base", sd_xl_base), ("sd_2_1", sd_2_1)])
def test_diffusers_unet_names_match_diffusers(name, module):
    config = module.get_config()
    n = config.model.params.network_config.params.num_res_blocks
    unet = unet_abstract_params(make_unet(config.model.params.network_config.params))
    modules = {key.rsplit(".", 1)[0] for key, _ in unet_key_map(unet).values()}
    pairs = sorted(f"{m} {seed_to_diffusers(m, n)}" for m in modules)
    assert (len(pairs), hashlib.sha256("\n".join(pairs).encode()).hexdigest()) == DIFFUSERS_MAP_DIGESTS[name]
    for seed_name, diffusers_name in UNET_MODULES.items():
        assert seed_to_diffusers(seed_name, 2) == diffusers_name


# ----------------------------------------------------------------------------- training


def test_lora_training_changes_only_adapters_and_exports(tmp_path):
    from sgm_jax.nn.unet import UNetModel

    model = UNetModel(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                      attention_resolutions=(2,), num_head_channels=16, context_dim=24)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda k: model.init(k, **model.example_inputs(batch=2, size=8)), jax.random.key(0))
    base = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32), abstract["params"])
    x, t = rng.standard_normal((2, 8, 8, 3), np.float32), np.array([10.0, 500.0], np.float32)
    ctx, target = rng.standard_normal((2, 5, 24), np.float32), rng.standard_normal((2, 8, 8, 3), np.float32)
    adapters = init_adapters(base, rank=4, alpha=8.0, target_modules=ATTENTION_TARGETS + CONV_TARGETS,
                             key=jax.random.key(1))
    assert {p[-1] for p, _ in adapter_items(adapters)} >= {"to_q", "to_out_0", "in_layers_2", "op", "conv"}
    forward = jax.jit(lambda p: model.apply({"params": p}, x, t, context=ctx))
    optimiser = optax.adam(1e-2)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(lambda a: jnp.mean((forward(merge_adapters(base, a)) - target) ** 2))(adapters)
        updates, opt_state = optimiser.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    before = jax.tree.map(np.array, base)
    initial = jax.tree.map(np.array, adapters)
    opt_state = optimiser.init(adapters)
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(adapters)  # only adapters in the optimiser
    losses = []
    for _ in range(3):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before)))
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(initial)))

    path = export_kohya(adapters, tmp_path / "trained.safetensors")
    with jax.default_matmul_precision("highest"):
        want = forward(merge_adapters(base, adapters))
        got = forward(apply_loras(base, [(path, 1.0)]))
    err = rel_err(got, want)
    print(f"exported kohya LoRA reloaded vs trained adapters: UNet output max relative error {err:.2e}")
    assert err <= TOL and rel_err(want, forward(base)) > 1e-3
    reloaded = load_adapters(path, base)
    for (pa, a), (pb, b) in zip(adapter_items(adapters), adapter_items(reloaded)):
        assert pa == pb and a.alpha == b.alpha == 8.0
        np.testing.assert_allclose(a.down, b.down, rtol=1e-6)
        np.testing.assert_allclose(a.up, b.up, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exported names all resolve
        apply_loras({"model": base}, [(path, 0.5)])


def test_a_scale_that_is_no_number_and_a_file_holding_nan_are_one_line(tmp_path):
    path = tmp_path / "style.safetensors"
    down = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v.lora_down.weight"
    up = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v.lora_up.weight"
    broken = np.ones((64, 2), np.float32)
    broken[3, 1] = np.nan
    save_file({down: np.ones((2, 64), np.float32), up: broken, "lora_unet_out_0.alpha": np.array([np.inf], np.float32)}, str(path))
    assert parse_lora_spec(f"{path}:0.5") == (str(path), 0.5)
    for tail in ("abc", "nan", "inf", ""):
        with pytest.raises(UserError) as info:
            parse_lora_spec(f"{path}:{tail}")
        assert str(info.value) == (f"--lora {path}:{tail}: the scale {tail!r} is not a number "
                                   f"(FILE[:SCALE], e.g. {path}:0.8)")
    with pytest.raises(UserError) as info:
        read_lora(path)
    assert str(info.value) == (f"LoRA file {path}: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_v."
                               "lora_up.weight holds NaN or Inf values (a damaged file or a diverged training): "
                               "re-export or re-download it")
