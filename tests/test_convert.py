"""Whole-checkpoint conversion (sgm_jax.convert.checkpoint) and the convert_torch_weights.py CLI.

Tiny SDXL- and SD 2.1-shaped configs (configs/inference/tiny_*.py) with random weights are
exported to seed-layout files and converted back; the full-size layouts are checked
abstractly (no weights) against published parameter counts, real key names, and digests of
the seed's own state-dict key lists.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.cli import convert as cli
from sgm_jax.configs.inference import sd_2_1, sd_xl_base, sd_xl_refiner, tiny_sd_2_1, tiny_sdxl
from sgm_jax.convert import checkpoint as ck
from sgm_jax.convert.common import flatten_params, unflatten_params
from sgm_jax.convert.layout import engine_parts
from sgm_jax.engine import build_engine
from sgm_jax.nn.conditioner import token_key

REPO = Path(__file__).resolve().parents[1]
TINY = {"sdxl": tiny_sdxl, "sd21": tiny_sd_2_1}


def random_params(config, seed: int = 0) -> dict:
    """Random float32 engine params with the config's exact tree (from the abstract layout)."""
    rng = np.random.default_rng(seed)
    flat = {p.params_path + path: rng.standard_normal(shape).astype(np.float32)
            for p in engine_parts(config) for path, shape in p.shapes.items()}
    return unflatten_params(flat)


def assert_trees_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{name: (config, params, seed-layout safetensors path)}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, module in TINY.items():
        config = module.get_config()
        params = random_params(config)
        path = ck.save_safetensors(ck.export_checkpoint(params, config), root / f"{name}.safetensors")
        out[name] = (config, params, path)
    return out


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # main() sets it; restored afterwards
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(TINY))
def test_export_convert_is_bit_exact(tiny, name):
    config, params, path = tiny[name]
    sd = ck.open_checkpoint(path)
    assert_trees_equal(ck.convert_checkpoint(sd, config), params)
    assert_trees_equal(ck.convert_checkpoint(sd, config, "bfloat16"),
                       jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_sd21_layout_uses_cond_stage_model(tiny):
    keys = ck.open_checkpoint(tiny["sd21"][2]).keys()
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.") for k in keys)
    assert not any(k.startswith("conditioner.") for k in keys)


@pytest.mark.parametrize("name", list(TINY))
def test_cli_convert_load_and_export(tiny, name, tmp_path, monkeypatch, capsys):
    config, params, path = tiny[name]
    cfg_file = REPO / "configs" / "inference" / f"{TINY[name].__name__.rsplit('.', 1)[-1]}.py"
    out = tmp_path / "params"
    rc, stdout, err = run_cli(monkeypatch, capsys, "--config", cfg_file, "--checkpoint", path, "--output", out)
    assert rc == 0, err
    assert "converted" in stdout
    assert_trees_equal(ck.load_params(out), params)
    meta = ck.read_metadata(out)
    assert meta["num_params"] == sum(x.size for x in jax.tree.leaves(params))
    assert meta["source"] == path.name
    # Back to a seed-layout file: the same tensors, bit for bit.
    exported = tmp_path / "back.safetensors"
    rc, _, err = run_cli(monkeypatch, capsys, "--export", "--config", cfg_file, "--checkpoint", out, "--output", exported)
    assert rc == 0, err
    a, b = ck.open_checkpoint(path), ck.open_checkpoint(exported)
    assert set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_converted_params_fit_the_engine(tiny):
    """The converted tree drives the engine's conditioner, UNet and VAE (shapes only)."""
    config, params, _ = tiny["sdxl"]
    engine = build_engine(config.model)
    tokens = np.zeros((1, 77), np.int32)
    batch = {token_key("txt", 0): tokens, token_key("txt", 1): tokens, "original_size_as_tuple": np.ones((1, 2)),
             "crop_coords_top_left": np.zeros((1, 2)), "target_size_as_tuple": np.ones((1, 2))}
    cond = jax.eval_shape(lambda p: engine.condition(p, batch), params)
    assert cond["crossattn"].shape == (1, 77, 64) and cond["vector"].shape == (1, 128)
    z = jnp.zeros((1, 8, 8, 4))
    cond = {k: jnp.zeros(v.shape) for k, v in cond.items()}
    assert jax.eval_shape(lambda p: engine.denoise(p, z, jnp.ones((1,)), cond), params).shape == z.shape
    assert jax.eval_shape(lambda p: engine.decode_first_stage(p, z), params).shape == (1, 64, 64, 3)


def test_equivalent_layouts_and_ignored_keys(tiny):
    """transformers-5 CLIP keys (no `text_model.`), SD 2.x text under the sgm prefix, and the
    known non-parameter entries of real files are all accepted."""
    config, params, path = tiny["sdxl"]
    sd = dict(ck.open_checkpoint(path))
    sd = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in sd.items()}
    sd.update({"conditioner.embedders.0.transformer.embeddings.position_ids": np.arange(77)[None],
               "conditioner.embedders.1.model.logit_scale": np.ones(()), "denoiser.sigmas": np.ones(1000),
               "alphas_cumprod": np.ones(1000), "model_ema.decay": np.ones(()), "first_stage_model.loss.w": np.ones(1)})
    assert_trees_equal(ck.convert_checkpoint(sd, config), params)
    config21, params21, path21 = tiny["sd21"]
    sd21 = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
            for k, v in ck.open_checkpoint(path21).items()}
    assert_trees_equal(ck.convert_checkpoint(sd21, config21), params21)


def test_clip_prefix_is_decided_by_a_parameter(tiny):
    """A lone `text_model.` buffer beside transformers-5 (flat) CLIP parameters: the whole
    converter and convert_clip_l both read the flat layout."""
    from sgm_jax.convert.text import convert_clip_l

    config, params, path = tiny["sdxl"]
    sd = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in ck.open_checkpoint(path).items()}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    assert_trees_equal(ck.convert_checkpoint(sd, config), params)
    embedder = build_engine(config.model).conditioner.specs[0].build()
    assert_trees_equal(convert_clip_l(sd, embedder), params["conditioner"]["embedders_0"])


def test_use_ema_reads_the_ema_buffers(tiny):
    config, params, path = tiny["sd21"]
    sd = dict(ck.open_checkpoint(path))
    ema = {"model_ema." + "diffusion_model" + k[len("model.diffusion_model."):].replace(".", ""): v * 2
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    converted = ck.convert_checkpoint({**sd, **ema, "model_ema.num_updates": np.ones(())}, config, use_ema=True)
    assert_trees_equal(converted["model"], jax.tree.map(lambda x: x * 2, params["model"]))


def test_params_dir_shards_and_atomic_save(tiny, tmp_path):
    config, params, _ = tiny["sd21"]
    out = ck.save_params(params, tmp_path / "sharded", {"note": "x"}, shard_bytes=4 << 20)
    meta = ck.read_metadata(out)
    assert len(meta["shards"]) > 3 and meta["note"] == "x"
    assert_trees_equal(ck.load_params(out), params)
    for dtype in ("bfloat16", "float16"):  # cast inside the restore
        assert_trees_equal(ck.load_params(out, dtype=dtype), jax.tree.map(lambda x: x.astype(dtype), params))

    def failing():  # a conversion that dies after a few shards were written
        for i, (path, value) in enumerate(flatten_params(params).items()):
            if i == 300:
                raise RuntimeError("disk on fire")
            yield path, value

    before = snapshot(out)
    for target, overwrite in ((out, True), (tmp_path / "fresh", False)):
        with pytest.raises(RuntimeError, match="disk on fire"):
            ck.save_params(failing(), target, shard_bytes=4 << 20, overwrite=overwrite)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


# ----------------------------------------------------------------------------- errors


def _truncated(path: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "truncated.safetensors"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _one_key_deleted(path: Path, tmp_path: Path) -> Path:
    sd = dict(ck.open_checkpoint(path))
    del sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]
    return ck.save_safetensors(sd, tmp_path / "one_key_deleted.safetensors")


@pytest.mark.parametrize("case,expect", [
    ("truncated", "truncated.safetensors: not a readable safetensors file"),
    ("wrong_model", "looks like an SD 2.x checkpoint"),
    ("key_deleted", "missing keys (1): model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
])
def test_bad_checkpoint_is_one_error_line_and_output_untouched(tiny, case, expect, tmp_path, monkeypatch, capsys):
    config_file = REPO / "configs" / "inference" / "tiny_sdxl.py"
    src = {"truncated": lambda: _truncated(tiny["sdxl"][2], tmp_path), "wrong_model": lambda: tiny["sd21"][2],
           "key_deleted": lambda: _one_key_deleted(tiny["sdxl"][2], tmp_path)}[case]()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous conversion")
    before, listing = snapshot(existing), sorted(os.listdir(tmp_path))
    for out, extra in ((existing, ["--overwrite"]), (tmp_path / "new", [])):
        rc, stdout, err = run_cli(monkeypatch, capsys, "--config", config_file, "--checkpoint", src, "--output", out,
                                  *extra)
        assert rc == cli.EXIT_ERROR and stdout == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
        assert snapshot(existing) == before and sorted(os.listdir(tmp_path)) == listing


def test_cli_subprocess_exit_code_and_stderr(tiny, tmp_path):
    """The real command line: exit code 2, one line on stderr, nothing created."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "convert_torch_weights.py"), "--config",
                           str(REPO / "configs/inference/tiny_sd_2_1.py"), "--checkpoint", str(tiny["sdxl"][2]),
                           "--output", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "looks like an SDXL base checkpoint" in proc.stderr, proc.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny, tmp_path, monkeypatch, capsys):
    config, params, path = tiny["sd21"]
    cfg = REPO / "configs/inference/tiny_sd_2_1.py"
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(monkeypatch, capsys, "--config", cfg, "--checkpoint", path, "--output", out)
    assert rc == 2 and "already exists" in err and os.listdir(out) == []
    rc, _, err = run_cli(monkeypatch, capsys, "--config", cfg, "--checkpoint", path, "--output", out, "--overwrite")
    assert rc == 0, err
    assert_trees_equal(ck.load_params(out), params)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_pickle_needs_opt_in(tiny, tmp_path, monkeypatch, capsys):
    config, params, path = tiny["sd21"]
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even a pickle")
    rc, _, err = run_cli(monkeypatch, capsys, "--config", REPO / "configs/inference/tiny_sd_2_1.py",
                         "--checkpoint", ckpt, "--output", tmp_path / "out")
    assert rc == 2 and "--allow-pickle" in err and err.count("\n") == 1
    with pytest.raises(ck.CheckpointFileError, match="allow-pickle"):
        ck.open_checkpoint(ckpt)


def test_pickle_with_opt_in_converts(tiny, tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    config, params, path = tiny["sd21"]
    sd = {k: torch.from_numpy(np.array(v)) for k, v in ck.open_checkpoint(path).items()}
    sd["betas"] = torch.ones(1000)  # an original LatentDiffusion buffer
    ckpt = tmp_path / "v2-tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    out = tmp_path / "out"
    rc, _, err = run_cli(monkeypatch, capsys, "--config", REPO / "configs/inference/tiny_sd_2_1.py",
                         "--checkpoint", ckpt, "--output", out, "--allow-pickle", "--dtype", "bfloat16")
    assert rc == 0, err
    assert_trees_equal(ck.load_params(out), jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert ck.read_metadata(out)["dtypes"] == ["bfloat16"]


# ----------------------------------------------------------------------------- full size (abstract)

# Parameter counts published for the released weights. OpenCLIP text towers: the real
# files also hold `logit_scale` (1 value), which is not a parameter of ours (ignored).
FULL_COUNTS = {
    "sd_xl_base": {"model": 2_567_463_684, "conditioner.embedders_0": 123_060_480,
                   "conditioner.embedders_1": 694_659_841 - 1, "first_stage": 83_653_863},
    "sd_xl_refiner": {"conditioner.embedders_0": 694_659_841 - 1, "first_stage": 83_653_863},
    "sd_2_1": {"model": 865_910_724, "conditioner.embedders_0": 354_032_641 - 1, "first_stage": 83_653_863},
}

# Keys and shapes of the real files (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0,
# v2-1_512-ema-pruned).
KNOWN_KEYS = {
    "sd_xl_base": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    },
    "sd_xl_refiner": {
        "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": (1536, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight": (1536, 1536),
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
    "sd_2_1": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    },
}

# sha256 of "\n".join(f"{key} {shape}") over the sorted UNet + VAE (+ CLIP-L) keys of the
# seed's own modules: sgm's UNetModel, Encoder, Decoder (quant convs added) and
# transformers' CLIPTextModel, instantiated on torch's meta device from the seed's yaml.
SEED_DIGESTS = {
    "sd_xl_base": (2124, "bd7c19686e0ac9d75567f773ad9965d74a35342e5427bbac62e886b89457103d"),
    "sd_xl_refiner": (1468, "c4be0588a48004775760c9ec355939dd81621bb5292d4be81d8e11e847fb4551"),
    "sd_2_1": (934, "81412269aeb1fb93f6ac96a7b4b436da8aefd94f84c1bf0caf2f10c4f91c1ae3"),
}
FULL = {"sd_xl_base": sd_xl_base, "sd_xl_refiner": sd_xl_refiner, "sd_2_1": sd_2_1}


def test_inference_configs_build():
    from sgm_jax.configs.inference import sd_2_1_768

    sizes = {sd_xl_base: 1024, sd_xl_refiner: 1024, sd_2_1: 512, sd_2_1_768: 768, tiny_sdxl: 64, tiny_sd_2_1: 64}
    for module, size in sizes.items():
        config = module.get_config()
        engine = build_engine(config.model)
        assert (config.inference.width, config.inference.height) == (size, size)
        assert len(config.inference.tokenizers) == sum(s.is_text for s in engine.conditioner.specs)
    assert type(build_engine(sd_2_1_768.get_config().model).denoiser.scaling).__name__ == "VScaling"


def test_class_embedder_layout():
    """Non-text embedders with params map generically (the seed's mnist_cond ClassEmbedder)."""
    from sgm_jax.configs import mnist_cond

    shapes = ck.checkpoint_shapes(mnist_cond.get_config())
    assert shapes["conditioner.embedders.0.embedding.weight"] == (10, 128)
    assert not any(k.startswith("first_stage_model.") for k in shapes)


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_layout(name):
    config = FULL[name].get_config()
    counts = {p.name: sum(int(np.prod(s)) for s in p.shapes.values()) for p in engine_parts(config)}
    for part, expected in FULL_COUNTS[name].items():
        assert counts[part] == expected, (part, counts[part])
    shapes = ck.checkpoint_shapes(config)
    for key, shape in KNOWN_KEYS[name].items():
        assert shapes.get(key) == shape, (key, shapes.get(key))
    seed_prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.")
    ours = sorted((k, s) for k, s in shapes.items() if k.startswith(seed_prefixes))
    digest = hashlib.sha256("\n".join(f"{k} {s}" for k, s in ours).encode()).hexdigest()
    assert (len(ours), digest) == SEED_DIGESTS[name]

