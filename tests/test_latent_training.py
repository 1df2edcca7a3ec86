"""Latent, text-conditioned training: an SDXL-architecture fine-tune on 8 simulated devices
with FSDP, from a converted checkpoint and captioned tar shards; the seed's LR schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import JAX_CACHE, REPO
from sgm_jax.cli.configs import load_config
from test_inference import BPE, convert_cli, write_random_checkpoint

PHOTOS = {"astronaut": "an astronaut in a white suit", "coffee": "a cup of coffee on a saucer",
          "chelsea": "a tabby cat looking left", "rocket": "a rocket on the launch pad",
          "camera": "a man with a camera on a tripod", "hubble_deep_field": "galaxies in deep space",
          "immunohistochemistry": "stained tissue under a microscope", "colorwheel": "a color wheel"}


def captioned_photos(folder: Path) -> Path:
    """scikit-image's real photographs (several non-square), shrunk, each with a caption file."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    folder.mkdir(parents=True)
    for name, caption in PHOTOS.items():
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        image.thumbnail((120, 120))
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from sgm_jax.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("finetune")
    micro = REPO / "tests" / "configs" / "micro_sdxl.py"
    converted = convert_cli(micro, write_random_checkpoint(load_config(str(micro)), tmp / "micro.safetensors", seed=5),
                            tmp / "converted")
    shards = prepare(str(captioned_photos(tmp / "photos")), str(tmp / "shards"), samples_per_shard=4, progress=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "SGM_JAX_CLIP_BPE": str(BPE), "SGM_JAX_TEST_CACHE": str(JAX_CACHE)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "finetune_worker.py"), str(converted), shards["urls"],
                           str(tmp)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return tmp, dict(np.load(tmp / "result.npz")), json.loads((tmp / "summary.json").read_text())


def test_sdxl_finetune_on_8_devices_trains_only_the_unet_and_samples(finetuned, tmp_path, monkeypatch):
    tmp, result, summary = finetuned
    assert int(result["devices"]) == 8 and int(result["sharded_leaves"]) > 0  # FSDP really splits the UNet
    assert summary["steps"] == [4, 4]
    assert bool(result["model_changed"])
    assert float(result["loss_after"]) < float(result["loss_before"]), result
    # frozen parts: loaded from the converted checkpoint, never in the trained state or its checkpoints
    assert summary["frozen_parts"] == ["conditioner", "first_stage"]
    assert "first_stage" not in summary["checkpoint_parts"]
    # AdamW moments exist for the trainable leaves only
    assert summary["opt_state_leaves_per_moment"] == summary["trainable_leaves"]
    # 2 steps + resume 2 from the tar shards = 4 uninterrupted steps, bit for bit
    assert bool(result["resume_equal"])
    # (one test, so that pytest-xdist never runs the fine-tune fixture twice) sample.py --workdir on the
    # result, restored on this process's one device: prompts in, PNGs out, the size / crop embedders
    # given the seed's sampling values
    import sample
    from PIL import Image

    monkeypatch.setenv("SGM_JAX_CLIP_BPE", str(BPE))
    out = tmp_path / "out"
    assert sample.main(["--workdir", str(tmp / "full"), "--prompt", "a tabby cat looking left", "--prompt",
                        "a rocket on the launch pad", "--num", "2", "--steps", "2", "--seed", "3", "--no-cache",
                        "--out", str(out)]) == 0
    images = [np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))]
    assert len(images) == 4 and all(x.shape == (64, 64, 3) for x in images)
    assert len({x.tobytes() for x in images}) == 4 and all(x.std() > 0 for x in images)


def test_lambda_linear_scheduler_matches_the_seed():
    """LambdaLinearScheduler's multiplier per optimiser step, transcribed from sgm/lr_scheduler.py
    (find_in_interval: n <= cum_cycles[i + 1] -> cycle i), for two cycles."""
    from sgm_jax.training.schedules import learning_rate_schedule

    params = {"warm_up_steps": [10, 5], "f_min": [0.1, 0.2], "f_max": [1.0, 0.8], "f_start": [1e-6, 0.3],
              "cycle_lengths": [50, 40]}

    def seed(n):
        cum = np.cumsum([0] + params["cycle_lengths"])
        cycle = next(i for i, c in enumerate(cum[1:]) if n <= c)
        n = n - cum[cycle]
        w, lo, hi, st, ln = (params[k][cycle] for k in ("warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths"))
        return (hi - st) / w * n + st if n < w else lo + (hi - lo) * (ln - n) / ln

    schedule = learning_rate_schedule(2e-4, {"target": "sgm.lr_scheduler.LambdaLinearScheduler", "params": params})
    ours = np.array([float(schedule(n)) for n in range(91)])
    np.testing.assert_allclose(ours, [2e-4 * seed(n) for n in range(91)], rtol=2e-6, atol=1e-12)
    assert ours[0] == pytest.approx(2e-10) and ours[10] == pytest.approx(2e-4 * 0.82)  # warm-up end, decay start


@pytest.mark.parametrize("name", ["imagenet_f8_cond", "txt2img_clipl", "txt2img_clipl_legacy_ucg_training",
                                  "sdxl_finetune", "sdxl_lora", "mnist_txt2img"])
def test_seed_training_configs_trace_their_whole_loss(name):
    """Each config's conditioner -> UNet -> first stage -> loss path fits together (shapes only:
    nothing is allocated, so even SDXL traces on a CPU in seconds)."""
    import importlib

    import jax

    from sgm_jax.checkpointing.frozen import abstract_full_params, split_params
    from sgm_jax.checkpointing.lora_params import lora_settings, new_adapters
    from sgm_jax.engine import build_engine
    from sgm_jax.inference.workdir import example_batch

    config = importlib.import_module(f"sgm_jax.configs.{name}").get_config()
    engine = build_engine(config.model)
    shape = (32, 32, 1) if name == "mnist_txt2img" else (64, 64, 3)
    example = {k: np.repeat(v, 2, axis=0) for k, v in example_batch(engine, shape).items()}
    abstract = abstract_full_params(engine, example)
    loss = jax.eval_shape(lambda p: engine.loss(p, example, jax.random.key(0))[0], abstract)
    assert loss.shape == () and loss.dtype == np.float32
    trainable, frozen = split_params(engine, abstract)
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    if name == "sdxl_finetune":
        assert n_trainable == 2_567_463_684 and set(frozen) == {"conditioner", "first_stage"}  # the UNet alone
    if name == "sdxl_lora":
        lora = jax.eval_shape(lambda: new_adapters(abstract, lora_settings(config), jax.random.key(0)))
        n_lora = sum(x.size for x in jax.tree_util.tree_leaves(lora))
        assert 10_000_000 < n_lora < 40_000_000, n_lora  # rank 16 on SDXL's attention projections
    if name.startswith("txt2img"):
        assert "embedders_0" in trainable["conditioner"]  # the seed trains its CLIP here
        assert config.model.params.conditioner_config.params.emb_models[0]["legacy_ucg_value"] == ""
