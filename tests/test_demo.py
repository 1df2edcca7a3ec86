"""The web demo (sgm_jax.cli.demo over sgm_jax.inference.service) and trained-workdir sampling.

A tiny class-conditional model is trained here for two steps (train.py's loop), and a tiny SDXL
gets random weights through the converter. The demo's images must equal sample.py's for the
same settings and seed, a new class / prompt / seed / scale must neither reload nor recompile,
and a real headless Chromium (Debian's `chromium`, driven by playwright; nothing downloads a
browser) must show those images. Its screenshot is kept in $SGM_JAX_TEST_ARTIFACTS (default
.pytest_cache/artifacts/, ignored by git). Without a browser or Gradio the browser test skips, saying why.
"""

from __future__ import annotations

import dataclasses

import contextlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, REPO
from test_inference import BPE, SDXL_CFG, write_random_checkpoint

from sgm_jax.cli.configs import load_config
from sgm_jax.convert.checkpoint import convert_file
from sgm_jax.inference.service import DemoRequest, DemoService, ModelSource

CHROMIUM = next((p for p in (os.environ.get("SGM_JAX_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if p and Path(p).is_file()), None)
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("SGM_JAX_TEST_ARTIFACTS", REPO / ".pytest_cache" / "artifacts"))
PROMPT, SEED = "a photo of a cat", 5


def tiny_train_config(max_steps: int = 2):
    config = load_config("mnist_cond")
    net = config.model.params.network_config.params
    net.update(num_res_blocks=1, channel_mult=(1,))
    config.model.params.sampler_config.params.num_steps = 3
    mnist = DATA / "mnist"
    config.data.params.update(batch_size=8, path=str(mnist) if mnist.is_dir() else "")
    config.training.update(max_steps=max_steps, checkpoint_every=1000, sample_every=0, log_every=1, name="tiny")
    return config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sgm_jax.training.loop import train

    root = tmp_path_factory.mktemp("demo")
    workdir = root / "tiny_mnist"
    train(tiny_train_config(), workdir)
    sources = [ModelSource.parse(str(workdir))]
    if BPE.is_file():
        os.environ.setdefault("SGM_JAX_CLIP_BPE", str(BPE))
        st = write_random_checkpoint(load_config(SDXL_CFG), root / "sdxl.safetensors", 0)
        sdxl = convert_file(st, load_config(SDXL_CFG), root / "tiny_sdxl", metadata={"config": "inference/tiny_sdxl"})
        sources.append(ModelSource.parse(str(sdxl)))
    service = DemoService(sources, root / "demo_out")
    return {"root": root, "workdir": workdir, "service": service, "sources": sources}


@pytest.fixture(scope="module")
def cli_images(models, tmp_path_factory):
    """sample.py's PNGs for the requests the demo tests repeat (class 3 / the prompt, 2 images, seed 5)."""
    out = tmp_path_factory.mktemp("cli")
    images = {"mnist": sample_cli("--workdir", models["workdir"], "--classes", "3", "--num", "2", "--seed", SEED,
                                  "--out", out / "mnist")}
    if len(models["sources"]) > 1:
        images["sdxl"] = sample_cli("--config", SDXL_CFG, "--checkpoint", models["sources"][1].path, "--prompt",
                                    PROMPT, "--num", "2", "--steps", "2", "--seed", SEED, "--out", out / "sdxl")
    return images


def sample_cli(*args: str) -> list[np.ndarray]:
    """Run sample.py (in this process) and read back its PNGs, in order."""
    import sample

    out = Path(args[args.index("--out") + 1])
    assert sample.main([*map(str, args), "--no-cache"]) == 0
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]


def png_pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in paths]


def test_demo_matches_sample_py_and_never_reloads_or_recompiles(models, cli_images, tmp_path):
    service, workdir = models["service"], models["workdir"]
    label = models["sources"][0].label
    events = []  # per-step progress, as the page shows it (the browser test reuses these compiled loops)
    paths, meta = service.generate(DemoRequest(model=label, classes=[3], seed=SEED, num=2), progress=events.append)
    assert service.cache.loads == 1 and meta["conditions"] == "3" and meta["step"] == 2
    assert [ev.step for ev in events] == [0, 1, 2]  # the model's 3 sampler steps, reported from the loop
    compiled = service.cache.compiled()
    cli = cli_images["mnist"]
    demo = png_pixels(paths)
    assert len(cli) == 2 and demo[0].shape == (28, 28) and demo[0].std() > 1
    for a, b in zip(demo, cli):
        np.testing.assert_array_equal(a, b)
    # a new class, seed and CFG scale: the same weights and compiled loop
    other, _ = service.generate(DemoRequest(model=label, classes=[7], seed=SEED + 1, num=2, cfg_scale=1.5),
                                progress=events.append)
    assert service.cache.loads == 1 and service.cache.compiled() == compiled
    assert np.abs(png_pixels(other)[0].astype(int) - demo[0]).mean() > 1
    # --num beyond one block of compiled batches: streamed block by block, the same pixels as one call
    model = service.cache.trained(str(workdir))
    whole = model.sample([3, 7], num=5, seed=SEED, batch_size=1).images
    streamed = sample_cli("--workdir", workdir, "--classes", "3,7", "--num", "5", "--batch-size", "1", "--seed",
                          SEED, "--out", tmp_path / "b")
    np.testing.assert_array_equal(np.stack(streamed), whole[..., 0])
    if len(models["sources"]) > 1:  # the converted tiny SDXL
        sdxl = models["sources"][1].label
        paths, meta = service.generate(DemoRequest(model=sdxl, prompt=PROMPT, seed=SEED, num=2, steps=2),
                                       progress=events.append)
        for a, b in zip(png_pixels(paths), cli_images["sdxl"]):
            np.testing.assert_array_equal(a, b)
        loads, compiled = service.cache.loads, service.cache.compiled()
        service.generate(DemoRequest(model=sdxl, prompt="a dog", negative_prompt="blurry", seed=1, num=2, steps=2,
                                     cfg_scale=7.0), progress=events.append)
        assert (service.cache.loads, service.cache.compiled()) == (loads, compiled)


def test_demo_bad_size_and_values_are_one_line(models):
    from sgm_jax.errors import USER_EXCEPTIONS, one_line

    service = models["service"]
    with pytest.raises(USER_EXCEPTIONS) as info:
        service.generate(DemoRequest(model=models["sources"][0].label, classes=[12]))
    assert "class 12 out of range" in one_line(info.value)
    with pytest.raises(USER_EXCEPTIONS, match="positive"):
        service.generate(DemoRequest(model=models["sources"][0].label, classes=[1], num=0))
    if len(models["sources"]) > 1:
        with pytest.raises(USER_EXCEPTIONS, match="width 100 px"):
            service.generate(DemoRequest(model=models["sources"][1].label, prompt="x", width=100, height=64))


def test_workdir_checkpoint_checked_before_compile_and_weights_only(models, tmp_path, capsys):
    import sample

    workdir = models["workdir"]
    rc = sample.main(["--workdir", str(workdir), "--no-cache", "--out", str(tmp_path),
                      "--config.model.params.network_config.params.model_channels=64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "params.model." in err and "different model" in err, err
    assert not list(tmp_path.iterdir())  # nothing written
    # a truncated newest checkpoint: the previous one is used; none left: one line
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for f in (broken / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    rc = sample.main(["--workdir", str(broken), "--no-cache", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "restores" in err, err
    assert not (tmp_path / "x.png").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(service: DemoService, tmp_path: Path):
    """The demo app over `service`, served on 127.0.0.1 for the block; yields its URL."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from sgm_jax.cli.demo import build_app

    port = free_port()
    app = build_app(service)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                       quiet=True, allowed_paths=[str(service.out_dir)])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@contextlib.contextmanager
def live_client(service: DemoService, tmp_path: Path):
    """A gradio_client Client on the demo app over `service`, for the block."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    with serving(service, tmp_path) as url:
        yield Client(url, verbose=False)


@contextlib.contextmanager
def browser_page(service: DemoService, tmp_path: Path, height: int = 1000):
    """A headless Chromium page on the demo app over `service` (skips without Chromium / playwright)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium at /usr/bin/chromium: install Debian's chromium (apt-get install chromium "
                    "chromium-driver; .ci/run does when it can) or set SGM_JAX_CHROMIUM")
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serving(service, tmp_path) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


def api_args(label: str, num: int, steps: int | None = None) -> tuple:
    """/generate's inputs for `num` images of class 3, seed SEED, the model's own sampler."""
    from sgm_jax.cli.demo import SAMPLER_OPTIONS

    return (label, "", "", ["3"], None, None, None, steps, None, "config", SEED, num, None, 0.75, "none", 0.15, "",
            *[None] * len(SAMPLER_OPTIONS))


def test_browser_generates_the_sample_py_images(models, cli_images, tmp_path):
    with browser_page(models["service"], tmp_path) as page:
        page.wait_for_selector("#generate", timeout=30000)

        def generate(n: int) -> list[np.ndarray]:
            page.locator("#seed input").fill(str(SEED))
            page.locator("#num input").fill(str(n))
            before = page.locator("#gallery img").evaluate_all("els => els.map(e => e.src)")
            page.locator("#generate").click()
            # new images: n of them, none of those shown before (every request writes new files)
            page.wait_for_function(
                "([n, before]) => { const s = [...document.querySelectorAll('#gallery img')].map(e => e.src);"
                " return s.length == n && s.every(x => !before.includes(x)); }", arg=[n, before], timeout=60000)
            srcs = page.locator("#gallery img").evaluate_all("els => els.map(e => e.src)")
            return [np.asarray(Image.open(_fetch(page, s))) for s in srcs]

        page.locator("#classes").get_by_label("0", exact=True).uncheck()
        page.locator("#classes").get_by_label("3", exact=True).check()
        shown = generate(2)
        assert len(shown) == 2
        for a, b in zip(shown, cli_images["mnist"]):
            np.testing.assert_array_equal(a, b)
        page.screenshot(path=str(ARTIFACTS / "demo_mnist.png"), full_page=True)
        if len(models["sources"]) > 1:
            page.locator("#model input").click()
            page.get_by_role("option", name=models["sources"][1].label).click()
            page.wait_for_function("document.querySelector('#prompt textarea') !== null")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#steps input").fill("2")
            shown = generate(2)
            for a, b in zip(shown, cli_images["sdxl"]):
                np.testing.assert_array_equal(a, b)
            page.screenshot(path=str(ARTIFACTS / "demo_sdxl.png"), full_page=True)


def _fetch(page, url: str):
    import io

    response = page.request.get(url)
    assert response.ok, url
    return io.BytesIO(response.body())


def test_text_conditioned_workdir_model_takes_prompts():
    """A workdir whose conditioner reads `txt` samples from prompts (random weights: the path, not quality)."""
    import jax

    from sgm_jax.configs import mnist_cond
    from sgm_jax.configs.inference import _parts as P
    from sgm_jax.engine import build_engine
    from sgm_jax.inference.workdir import TrainedModel, example_batch, inference_defaults

    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary {BPE} absent")
    os.environ.setdefault("SGM_JAX_CLIP_BPE", str(BPE))
    config = load_config("mnist_cond")
    config.model.params.network_config = mnist_cond.unet(
        num_res_blocks=1, channel_mult=(1,), attention_resolutions=(1,), context_dim=32, num_classes=None,
        adm_in_channels=None, transformer_depth=1, use_linear_in_transformer=True)
    config.model.params.conditioner_config = P.conditioner({**P.embedder(
        "FrozenCLIPEmbedder", "txt", layer="hidden", layer_idx=1, width=32, vocab_size=49408, layers=2, heads=2),
        "ucg_rate": 0.1})
    config.model.params.sampler_config.params.num_steps = 1
    engine = build_engine(config.model)
    config.inference = inference_defaults(engine, (28, 28, 1))
    params = engine.init_params(jax.random.key(0), example_batch(engine, (28, 28, 1)))
    model = TrainedModel("text_run", config, engine, params, 0, (28, 28, 1))
    assert model.condition_key == "txt"
    c_seven, uc = model.condition("a seven")
    c_one, _ = model.condition("a one")
    assert np.abs(np.asarray(c_seven["crossattn"]) - np.asarray(c_one["crossattn"])).max() > 1e-3
    assert not np.any(np.asarray(uc["crossattn"]))  # ucg'd text: uc is zeroed, as in training
    result = model.sample(["a seven", "a one"], num=1, seed=1)
    assert result.images.shape == (2, 28, 28, 1) and result.captions == ["a seven", "a one"]
    again = model.sample(["a seven", "a one"], num=1, seed=1, start=1, count=1, batch_size=1)
    whole = model.sample(["a seven", "a one"], num=1, seed=1, batch_size=1)
    np.testing.assert_array_equal(again.images[0], whole.images[1])


def test_gallery_captions_name_the_class_or_the_prompt(tmp_path):
    from PIL import PngImagePlugin

    from sgm_jax.cli.demo import _caption

    for condition, shown in (("3", "class 3"), ("an image of a seven", "an image of a seven"), ("", "")):
        info = PngImagePlugin.PngInfo()
        info.add_text("condition", condition)
        path = tmp_path / f"{len(condition)}.png"
        Image.new("L", (4, 4)).save(path, pnginfo=info)
        assert _caption(path) == shown


def test_gradio_api_serves_without_the_page_and_caps_abusive_requests(models, cli_images, tmp_path):
    """gradio_client against a live server on 127.0.0.1: class choices exist without a page load; a request
    beyond the caps is one message naming the cap, and the valid request after it is served."""
    label = models["sources"][0].label
    service = DemoService(models["sources"][:1], tmp_path / "out", max_images=4, max_pixels=3 * 28 * 28)
    service.cache = models["service"].cache  # the weights and compiled loop the other tests loaded
    with live_client(service, tmp_path) as client:
        def generate(num: int) -> tuple:
            return client.predict(*api_args(label, num), api_name="/generate")

        assert generate(10**6)[3] == ("error: 1000000 images asked: this demo serves at most 4 per request "
                                      "(sgm-demo --max-images)")
        assert generate(4)[3] == ("error: 4 images of 28x28 are 3,136 pixels: this demo serves at most 2,352 "
                                  "(width x height x images) per request (sgm-demo --max-pixels)")
        gallery, files, meta, status = generate(2)
        assert status.startswith("2 image(s) in") and meta["conditions"] == "3"
        shown = [np.asarray(Image.open(item["image"])) for item in gallery]
        for a, b in zip(shown, cli_images["mnist"], strict=True):
            np.testing.assert_array_equal(a, b)
        # a seed beyond the generator's range is reduced modulo 2**32, not a traceback in the server log
        paths, _ = service.generate(DemoRequest(model=label, classes=[3], seed=2**70 + SEED, num=2))
        for a, b in zip(png_pixels(paths), cli_images["mnist"], strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_request_its_client_cancels_stops_and_the_next_one_is_served(models, cli_images, tmp_path, caplog):
    """gradio_client submits 64 images in 64 batches of one (a long request), cancels it once it runs,
    and asks for 2 images: the cancelled run stops at the next batch's end (the server log, logger
    sgm_jax.demo, says after how many), and the valid request gets sample.py's pixels."""
    import logging
    import time

    from gradio_client.utils import Status

    caplog.set_level(logging.INFO, logger="sgm_jax.demo")
    label = models["sources"][0].label
    service = DemoService(models["sources"][:1], tmp_path / "out")  # its own cache: batches of one image
    model = service.cache.trained(str(models["workdir"]), step_progress=True)
    model.defaults = dataclasses.replace(model.defaults, batch_per_device=1)
    batches = 64 // model.batch_size(64)
    with live_client(service, tmp_path) as client:
        job = client.submit(*api_args(label, 64, steps=20), api_name="/generate")
        deadline = time.monotonic() + 300
        while not (job.status().code == Status.PROGRESS or job.done()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not job.done(), "the long request ended before it could be cancelled"
        job.cancel()
        gallery, files, meta, status = client.predict(*api_args(label, 2), api_name="/generate")
        assert status.startswith("2 image(s) in") and meta["conditions"] == "3"
        for item, expected in zip(gallery, cli_images["mnist"], strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(item["image"])), expected)
    lines = [r.getMessage() for r in caplog.records if r.name == "sgm_jax.demo" and r.getMessage().startswith("cancelled")]
    assert len(lines) == 1, lines
    stopped = int(lines[0].split("stopped after ")[1].split(" of ")[0])
    assert lines[0].endswith(f" of {batches} batches ({model.name})") and 1 <= stopped < batches, lines
    assert not list(service.out_dir.glob("*/*_s5_063.png"))  # the cancelled request wrote nothing
