"""End-to-end sampling on the tiny SDXL- and SD 2.1-shaped configs (CPU, random weights).

Weights: a random PyTorch-layout state dict -> .safetensors -> convert_torch_weights.py ->
Orbax directory -> load_checkpoint, i.e. the path a user's real checkpoint takes. The
8-device sharded run (sample.py CLI in a subprocess with 8 simulated CPU devices) starts in
the background as soon as the weights exist and is compared with the 1-device run here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sample.py
DATA = Path(os.environ.get("SGM_JAX_SHARED", REPO.parent / "shared")) / "data"

from sgm_jax.configs.inference import _parts as P  # noqa: E402
from sgm_jax.configs.inference import tiny_sdxl  # noqa: E402
from sgm_jax.convert.checkpoint import convert_file, save_safetensors  # noqa: E402
from sgm_jax.convert.layout import checkpoint_shapes  # noqa: E402
from sgm_jax.inference import (Pipeline, SamplerSpec, SizeError, check_size, engine_for_sampling,  # noqa: E402
                               load_checkpoint, load_config, load_image, to_uint8, txt2img_with_refiner)

BPE = DATA / "clip" / "bpe_simple_vocab_16e6.txt.gz"
SDXL_CFG = REPO / "configs" / "inference" / "tiny_sdxl.py"
SD21_CFG = REPO / "configs" / "inference" / "tiny_sd_2_1.py"
PROMPT, SEED, STEPS, NUM = "a photo of a cat", 7, 2, 8
SPEC = SamplerSpec.create("euler_edm", STEPS)

pytestmark = pytest.mark.skipif(not BPE.is_file(), reason=f"CLIP BPE vocabulary {BPE} absent (../shared/data/clip)")


def tiny_refiner_config():
    """sd_xl_refiner shrunk like tiny_sdxl: OpenCLIP-G only, size + crop + aesthetic-score conditioning."""
    cfg = load_config(SDXL_CFG)
    t = tiny_sdxl
    params = cfg.model.params
    params.network_config.params.adm_in_channels = t.POOLED_DIM + 5 * t.SIZE_DIM
    params.network_config.params.context_dim = t.OPENCLIP_WIDTH
    params.conditioner_config = P.conditioner(
        P.embedder("FrozenOpenCLIPEmbedder2", "txt", arch="ViT-bigG-14", freeze=True, layer="penultimate",
                   always_return_pooled=True, legacy=False, width=t.OPENCLIP_WIDTH, embed_dim=t.POOLED_DIM, **t.TEXT),
        P.size_embedder("original_size_as_tuple", t.SIZE_DIM),
        P.size_embedder("crop_coords_top_left", t.SIZE_DIM),
        P.size_embedder("aesthetic_score", t.SIZE_DIM),
    )
    cfg.inference.tokenizers = ["tokenizer_2"]
    cfg.inference.update(refiner_strength=0.15, aesthetic_score=6.0, negative_aesthetic_score=2.5)
    return cfg


def write_random_checkpoint(config, path: Path, seed: int, dtype=np.float32) -> Path:
    """Random weights in the seed's PyTorch key layout (norm scales near 1, small weights),
    stored as `dtype` (float16: the released *_fp16 files)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in checkpoint_shapes(config).items():
        is_norm_scale = len(shape) == 1 and key.endswith("weight") and ("norm" in key or ".ln_" in key)
        scale = 0.02 if len(shape) == 1 else 0.08
        sd[key] = (float(is_norm_scale) + scale * rng.standard_normal(shape)).astype(dtype)
    return save_safetensors(sd, path)


def convert_cli(config_path: Path, safetensors: Path, out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("convert_torch_weights", REPO / "convert_torch_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--config", str(config_path), "--checkpoint", str(safetensors), "--output", str(out)]) == 0
    return out


def sample_cmd(config: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "sample.py"), "--config", str(config), "--checkpoint", str(checkpoint),
            "--prompt", PROMPT, "--steps", str(STEPS), "--seed", str(SEED), "--sampler", "euler_edm",
            "--out", str(out), *extra]


def background(*cmds: list[str], devices: int = 1, xla_flags: str = "") -> subprocess.Popen:
    """Run sample.py commands one after the other in the background (the test machine's other
    cores compile them while this process compiles its own)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {xla_flags}",
           "JAX_PLATFORMS": "cpu",
           "SGM_JAX_CLIP_BPE": str(BPE)}
    script = "import subprocess, sys\nfor cmd in %r:\n    print('$', *cmd[2:], flush=True)\n" \
             "    rc = subprocess.call(cmd)\n    if rc:\n        sys.exit(rc)\n" % (cmds,)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Converted checkpoint dirs, 1-device pipelines here, and two background CLI runs:
    tiny_sdxl on 8 simulated devices, and tiny_sd_2_1 with a persistent compilation cache."""
    from sgm_jax.nn.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("inference")
    dirs, procs = {}, {}
    st = write_random_checkpoint(load_config(SDXL_CFG), root / "sdxl.safetensors", 0)
    dirs["sdxl"] = convert_cli(SDXL_CFG, st, root / "sdxl")
    procs["sharded"] = background(sample_cmd(SDXL_CFG, dirs["sdxl"], root / "sharded", "--num", str(NUM),
                                             "--cfg-scale", "5", "--no-cache"), devices=8)
    st = write_random_checkpoint(load_config(SD21_CFG), root / "sd21.safetensors", 1)
    dirs["sd21"] = convert_cli(SD21_CFG, st, root / "sd21")
    # cheaper LLVM codegen for this process: its images are only compared with themselves
    sd21 = sample_cmd(SD21_CFG, dirs["sd21"], root / "sd21", "--num", "2", "--negative-prompt", "blurry",
                      "--cfg-scale", "7", "--cache-dir", str(root / "jax_cache"))
    procs["sd21"] = background(sd21, xla_flags="--xla_backend_optimization_level=0")
    refiner_cfg = tiny_refiner_config()  # no config file: convert_file is the CLI's core
    st = write_random_checkpoint(refiner_cfg, root / "refiner.safetensors", 2)
    dirs["refiner"] = convert_file(st, refiner_cfg, root / "refiner")
    tok = load_tokenizer(BPE)
    pipes = {"sdxl": Pipeline(load_config(SDXL_CFG), load_checkpoint(dirs["sdxl"], SDXL_CFG), clip_tokenizer=tok,
                              name="tiny_sdxl"),
             "refiner": Pipeline(refiner_cfg, load_checkpoint(dirs["refiner"], "tiny_refiner"), clip_tokenizer=tok,
                                 name="tiny_refiner")}
    yield {"dirs": dirs, "pipes": pipes, "procs": procs, "root": root}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return output


def read_pngs(folder: Path) -> tuple[np.ndarray, list[dict]]:
    paths = sorted(folder.glob("*.png"))
    images = [Image.open(p) for p in paths]
    return np.stack([np.asarray(im.convert("RGB")) for im in images]), [dict(im.text) for im in images]


@pytest.fixture(scope="module")
def sdxl_images(models):
    return models["pipes"]["sdxl"].txt2img(PROMPT, "", num=NUM, seed=SEED, spec=SPEC, cfg_scale=5.0).images


def test_txt2img_sdxl_shapes_and_determinism(models, sdxl_images):
    pipe = models["pipes"]["sdxl"]
    chex.assert_shape(sdxl_images, (NUM, 64, 64, 3))
    chex.assert_type(sdxl_images, np.uint8)
    assert sdxl_images.std() > 1.0  # not a constant image
    again = pipe.txt2img(PROMPT, "", num=NUM, seed=SEED, spec=SPEC, cfg_scale=5.0).images
    np.testing.assert_array_equal(again, sdxl_images)
    other = pipe.txt2img(PROMPT, "", num=NUM, seed=SEED + 1, spec=SPEC, cfg_scale=5.0).images
    assert np.abs(other.astype(int) - sdxl_images).mean() > 1.0
    # image i's noise depends on (seed, i) only: images of one request differ from each other
    assert np.abs(sdxl_images[0].astype(int) - sdxl_images[1]).mean() > 1.0
    # a new CFG scale / prompt reuses the compiled loop (scale is traced, text has its own jit)
    n_compiled = len(pipe.runner._executables)
    pipe.txt2img("a dog", "", num=NUM, seed=SEED, spec=SPEC, cfg_scale=2.0)
    # more images than one call's batch: chunks of the same shape (last one padded), and
    # image i depends on (seed, i) only, not on how the request was split
    more = pipe.txt2img(PROMPT, "", num=NUM + 2, seed=SEED, spec=SPEC, cfg_scale=5.0, batch_size=NUM).images
    chex.assert_shape(more, (NUM + 2, 64, 64, 3))
    np.testing.assert_array_equal(more[:NUM], sdxl_images)
    fewer = pipe.txt2img(PROMPT, "", num=3, seed=SEED, spec=SPEC, cfg_scale=5.0, batch_size=NUM).images
    np.testing.assert_array_equal(fewer, sdxl_images[:3])
    assert len(pipe.runner._executables) == n_compiled


def test_img2img_strength_zero_is_vae_roundtrip(models, tmp_path):
    pipe = models["pipes"]["sdxl"]
    pixels = np.asarray(jax.random.randint(jax.random.key(3), (72, 80, 3), 0, 256), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    image = load_image(tmp_path / "init.png", multiple=32)  # floored to 64x64, as the seed floors to 64
    chex.assert_shape(image, (1, 64, 64, 3))
    assert image.min() >= -1.0 and image.max() <= 1.0
    out = pipe.img2img(image, PROMPT, strength=0.0, num=2, seed=SEED, spec=SPEC)
    np.testing.assert_array_equal(out.sigmas["tiny_sdxl"], [0.0])  # nothing left to denoise
    engine, params = pipe.engine, pipe.params
    roundtrip = jax.jit(lambda p, x: to_uint8(engine.decode_first_stage(p, engine.encode_first_stage(p, x))))
    expected = np.asarray(roundtrip(params, image))
    chex.assert_shape(out.images, (2, 64, 64, 3))
    assert np.abs(out.images.astype(int) - expected).max() <= 1
    assert np.abs(out.images.astype(int) - expected).mean() < 0.01


def test_refiner_handoff_sigma_ranges(models):
    """Base (img2img at strength 1: the image is VAE-encoded and noised to sigma_max, the seed's
    do_img2img, through the UNet) stopping early -> refiner finishing; one compile per stage."""
    base, refiner = models["pipes"]["sdxl"], models["pipes"]["refiner"]
    steps, strength = 4, 0.5
    full = SamplerSpec.create("euler_edm", steps).sigmas()
    events: dict[str, list[int]] = {}
    image = np.asarray(jax.random.uniform(jax.random.key(4), (1, 64, 64, 3), minval=-1.0, maxval=1.0))
    result = txt2img_with_refiner(base, refiner, PROMPT, strength=strength, num=2, seed=SEED, init_image=image,
                                  img2img_strength=1.0, base_spec=SamplerSpec.create("euler_edm", steps),
                                  refiner_spec=SamplerSpec.create("euler_edm", steps), cfg_scale=5.0,
                                  progress=lambda ev: events.setdefault(ev.stage, []).append(ev.step))
    base_sigmas, ref_sigmas = result.sigmas["tiny_sdxl"], result.sigmas["tiny_refiner"]
    assert base_sigmas[0] == full[0]             # the base starts at the top of the schedule,
    assert base_sigmas[-1] > 0                   # stops early (Txt2NoisyDiscretizationWrapper) ...
    assert ref_sigmas[0] == base_sigmas[-1]      # ... exactly where the refiner starts,
    assert ref_sigmas[-1] == 0.0                 # and the refiner finishes the schedule
    np.testing.assert_array_equal(np.concatenate([base_sigmas, ref_sigmas[1:]]), full)
    # both models ran every step of their range
    assert events == {"tiny_sdxl": list(range(len(base_sigmas) - 1)), "tiny_refiner": list(range(len(ref_sigmas) - 1))}
    chex.assert_shape(result.images, (2, 64, 64, 3))
    chex.assert_type(result.images, np.uint8)


def test_conditioning_uc_and_size_vectors(models):
    sdxl, refiner = models["pipes"]["sdxl"], models["pipes"]["refiner"]
    size_dim = tiny_sdxl.SIZE_DIM
    assert sdxl.zero_uc_keys == ("txt",)
    c, uc = sdxl.condition(sdxl.values(PROMPT, "", 64, 64))
    chex.assert_shape(c["crossattn"], (1, 77, tiny_sdxl.CLIP_WIDTH + tiny_sdxl.OPENCLIP_WIDTH))
    chex.assert_shape(c["vector"], (1, tiny_sdxl.POOLED_DIM + 6 * size_dim))
    assert not np.any(np.asarray(uc["crossattn"]))  # seed: force_uc_zero_embeddings=["txt"]
    np.testing.assert_array_equal(c["vector"][:, -6 * size_dim:], uc["vector"][:, -6 * size_dim:])
    _, uc_neg = sdxl.condition(sdxl.values(PROMPT, "blurry", 64, 64))
    assert np.any(np.asarray(uc_neg["crossattn"]))  # an explicit negative prompt is used
    c2, _ = sdxl.condition(sdxl.values(PROMPT, "", 128, 64))
    assert np.any(np.asarray(c2["vector"] != c["vector"]))  # target / original size conditioning
    assert refiner.zero_uc_keys == ()
    rc, ruc = refiner.condition(refiner.values(PROMPT, "", 64, 64))
    aesthetic = slice(-size_dim, None)
    assert np.any(np.asarray(rc["vector"][:, aesthetic] != ruc["vector"][:, aesthetic]))  # 6.0 vs 2.5
    np.testing.assert_array_equal(rc["vector"][:, -3 * size_dim:-size_dim], ruc["vector"][:, -3 * size_dim:-size_dim])


def test_bad_size_is_one_clear_line(capsys):
    import sample

    assert sample.main(["--config", str(SDXL_CFG), "--checkpoint", "/nonexistent", "--width", "100",
                        "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "width 100 px" in err and "multiple of 32" in err
    with pytest.raises(SizeError, match="height 72 px"):  # SD 2.1-shaped: VAE 8 x UNet 4
        check_size(engine_for_sampling(load_config(SD21_CFG), "float32"), 64, 72, "tiny_sd_2_1")


def test_missing_checkpoint_and_tokenizer_lines(models, capsys, tmp_path):
    import sample

    missing = tmp_path / "sd_xl_base"
    assert sample.main(["--config", str(SDXL_CFG), "--checkpoint", str(missing), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert (f"python convert_torch_weights.py --config {SDXL_CFG} --checkpoint <your .safetensors> "
            f"--output {missing}") in err
    assert sample.main(["--config", str(SDXL_CFG), "--checkpoint", str(models["dirs"]["sdxl"]),
                        "--tokenizer", str(tmp_path / "no_tokenizer"), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CLIP tokenizer" in err
    assert sample.main(["--workdir", str(tmp_path / "no_run"), "--no-cache"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_weights_of_another_model_are_one_line_before_any_compile(models, capsys, tmp_path):
    import sample

    # SD 2.1-shaped weights with the SDXL config: the first differing key, nothing written
    assert sample.main(["--config", str(SDXL_CFG), "--checkpoint", str(models["dirs"]["sd21"]), "--no-cache",
                        "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the weights in {models['dirs']['sd21']} do not fit" in err, err
    assert "conditioner.embedders_" in err or "model." in err
    assert not (tmp_path / "out").exists()


def test_cli_sd21_eps_and_persistent_cache(models):
    output = finished(models["procs"]["sd21"])
    images, meta = read_pngs(models["root"] / "sd21")
    chex.assert_shape(images, (2, 64, 64, 3))
    chex.assert_type(images, np.uint8)
    assert np.abs(images[0].astype(int) - images[1]).mean() > 1.0
    assert meta[0]["negative_prompt"] == "blurry" and meta[0]["model"] == "tiny_sd_2_1" and meta[0]["size"] == "64x64"
    # with the cache on, the sampling loop (jit_run) has no host callback and is written to disk
    assert any(p.name.startswith("jit_run") for p in (models["root"] / "jax_cache").iterdir()), output
    print(output)


def test_cli_sharded_8_devices_matches_single_device_and_png_metadata(models, sdxl_images):
    output = finished(models["procs"]["sharded"])
    assert "8 cpu device(s)" in output and "compile" in output
    sharded, meta = read_pngs(models["root"] / "sharded")
    chex.assert_shape(sharded, sdxl_images.shape)
    # the same computation split over 8 devices: equal up to float summation order
    assert np.abs(sharded.astype(int) - sdxl_images).max() <= 1
    assert np.mean(sharded != sdxl_images) < 0.01
    for key, value in {"prompt": PROMPT, "negative_prompt": "", "seed": str(SEED), "sampler": "euler_edm",
                       "steps": str(STEPS), "cfg_scale": "5.0", "width": "64", "height": "64",
                       "model": "tiny_sdxl"}.items():
        assert meta[0].get(key) == value, (key, meta[0])
    assert [m["index"] for m in meta] == [str(i) for i in range(NUM)]
    print(output)


def test_cli_lora_files_are_merged(models, capsys, tmp_path):
    """--lora FILE:SCALE: a LoCon file on the UNet's last conv (kohya layout); scale 0 leaves the
    image as it was, scale 1 changes it; a missing file is one line."""
    import sample
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_out_2.lora_down.weight": rng.standard_normal((2, 32, 3, 3)).astype(np.float32),
               "lora_unet_out_2.lora_up.weight": rng.standard_normal((4, 2, 1, 1)).astype(np.float32),
               "lora_unet_out_2.alpha": np.asarray(2.0, np.float32)}, str(lora))
    base = ["--config", str(SDXL_CFG), "--checkpoint", str(models["dirs"]["sdxl"]), "--prompt", PROMPT,
            "--steps", str(STEPS), "--seed", str(SEED), "--no-cache"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("one", ["--lora", f"{lora}:1.0"])):
        assert sample.main([*base, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = Image.open(tmp_path / f"{name}.png")
    np.testing.assert_array_equal(np.asarray(images["zero"]), np.asarray(images["plain"]))
    assert np.abs(np.asarray(images["one"], int) - np.asarray(images["plain"])).mean() > 1.0
    assert images["one"].text["loras"] == "style.safetensors:1"
    capsys.readouterr()
    assert sample.main([*base, "--lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LoRA file" in err and "not found" in err


def test_one_request_builder_fills_what_the_caller_leaves_from_the_inference_section():
    """sample.py and the demo build their request through ImageRequest.create: defaults from the
    config's inference section, a refiner step count of its own, the init image's size winning."""
    from sgm_jax.inference.requests import ImageRequest

    inf = dict(tiny_sdxl.get_config().inference)
    plain = ImageRequest.create(inf, prompt="a fox")
    assert (plain.width, plain.height, plain.num, plain.seed) == (inf["width"], inf["height"], inf["num_samples"],
                                                                   inf["seed"])
    assert plain.spec.steps == plain.refiner_spec.steps == inf["num_steps"] and plain.cfg_scale == inf["cfg_scale"]
    assert plain.negative_prompt == inf["negative_prompt"] and plain.init_image is None
    asked = ImageRequest.create(inf, prompt="a fox", steps=7, refiner_steps=3, cfg_scale=2.0, num=5,
                                init_image=np.zeros((1, 48, 80, 3), np.float32), img2img_strength=0.4)
    assert (asked.spec.steps, asked.refiner_spec.steps, asked.cfg_scale, asked.num) == (7, 3, 2.0, 5)
    assert (asked.width, asked.height) == (80, 48)
    meta = asked.metadata()
    assert meta["size"] == "80x48" and meta["steps"] == 7 and meta["strength"] == 0.4 and "refiner" not in meta
