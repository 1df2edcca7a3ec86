"""Image to video through sample.py: a tiny SVD (configs/inference/tiny_svd.py: svd_xt's layout at
toy widths) written as a seed-layout safetensors file with random weights, converted by
convert_torch_weights.py, sampled from an init image into PNG frames and a GIF, the same pixels
as the library's sample_video; bad requests are one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from sgm_jax.cli import sample as sample_cli
from sgm_jax.config_files import load_config
from sgm_jax.convert.layout import abstract_engine_params, engine_parts
from sgm_jax.inference.loading import load_image
from sgm_jax.inference.models import load_pipeline
from sgm_jax.inference.video import sample_video
from test_inference import convert_cli, write_random_checkpoint

CONFIG = REPO / "configs" / "inference" / "tiny_svd.py"
SEED = 5


@pytest.fixture(scope="module")
def tiny_svd(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd")
    config = load_config(str(CONFIG))
    checkpoint = convert_cli(CONFIG, write_random_checkpoint(config, root / "tiny_svd.safetensors", 0), root / "ckpt")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:70, 0:90]
    picture = np.stack([xx * 2.8, yy * 3.6, 128 + 60 * np.sin(xx / 7.0)], -1) + rng.normal(0, 8, (70, 90, 3))
    init = root / "in.png"
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(init)
    return {"root": root, "checkpoint": checkpoint, "init": init, "config": config}


def sample(tiny_svd, out: Path, *extra: str) -> int:
    return sample_cli.main(["--config", str(CONFIG), "--checkpoint", str(tiny_svd["checkpoint"]), "--init-image",
                            str(tiny_svd["init"]), "--num-frames", "4", "--fps", "8", "--motion-bucket-id", "100",
                            "--seed", str(SEED), "--no-cache", "--out", str(out), *extra])


def test_the_seed_layout_file_holds_every_svd_part(tiny_svd):
    """The converter read every key: the VideoUNet, OpenCLIP's image tower (embedder 0), the frame
    encoder (embedder 3) and the VideoDecoder first stage."""
    names = {p.name for p in engine_parts(tiny_svd["config"])}
    assert names == {"model", "conditioner.embedders_0", "conditioner.embedders_3", "first_stage"}


def test_sample_py_writes_the_library_video_as_frames_and_gif(tiny_svd, capsys):
    frames_dir, gif = tiny_svd["root"] / "frames", tiny_svd["root"] / "video.gif"
    assert sample(tiny_svd, frames_dir) == 0, capsys.readouterr().err
    assert sample(tiny_svd, gif) == 0, capsys.readouterr().err
    pngs = sorted(frames_dir.glob("*.png"))
    assert len(pngs) == 4
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    meta = Image.open(pngs[0]).text
    assert frames.shape == (4, 64, 80, 3)  # 90x70 floored to the model's multiple of 16
    assert (meta["num_frames"], meta["fps_id"], meta["motion_bucket_id"], meta["fps"]) == ("4", "7", "100", "8")
    assert meta["guider"] == "LinearPredictionGuider" and meta["steps"] == "3"

    with Image.open(gif) as im:
        # 8 fps: 125 ms a frame, which GIF stores in 10 ms units
        assert im.n_frames == 4 and im.size == (80, 64) and abs(im.info["duration"] - 125) <= 10
        first = np.asarray(im.convert("RGB"))
    # the GIF's palette approximates the first frame
    assert np.abs(first.astype(int) - frames[0].astype(int)).mean() < 12

    pipeline = load_pipeline(tiny_svd["config"], tiny_svd["checkpoint"], config_label=str(CONFIG))
    image = load_image(tiny_svd["init"], None, None, 16)
    want = sample_video(pipeline, image, num_frames=4, fps_id=7, motion_bucket_id=100, cond_aug=0.02, seed=SEED,
                        decoding_t=2)
    np.testing.assert_array_equal(frames, want)  # frames under 256 px are saved unstamped
    assert np.std(want.astype(np.float32), axis=(1, 2, 3)).min() > 1.0  # not a blank video


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "a cat"], "--prompt is not for an image-to-video model"),
    (["--out", "OUT.png"], "a video is an .mp4 or .gif file, or a folder"),
    (["--num-frames", "0"], "num_frames must be a positive integer"),
])
def test_bad_video_requests_are_one_line(tiny_svd, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "v.png") if a == "OUT.png" else a for a in extra]
    rc = sample(tiny_svd, tmp_path / "frames", *extra)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and message in err, err


def test_no_init_image_and_mp4_without_ffmpeg_are_one_line(tiny_svd, tmp_path, capsys):
    rc = sample_cli.main(["--config", str(CONFIG), "--checkpoint", str(tiny_svd["checkpoint"]),
                          "--out", str(tmp_path / "v.gif")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "give --init-image" in err
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        rc = sample(tiny_svd, tmp_path / "v.mp4")
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and "imageio[ffmpeg]" in err


def test_full_size_svd_xt_traces_with_abstract_shapes():
    """SVD-XT as released (2.29 B parameters in bfloat16, 25 frames of 576x1024, 30 guided steps,
    chunked decoding of 14 frames): the whole sampling function traces from shapes alone."""
    import functools

    import jax
    import jax.numpy as jnp

    from sgm_jax.inference.pipeline import engine_for_sampling
    from sgm_jax.inference.sampling import SamplerSpec
    from sgm_jax.inference.video import _sample
    from sgm_jax.sampling_defaults import SamplingDefaults

    config = load_config("inference/svd_xt")
    engine = engine_for_sampling(config, "bfloat16")
    params = abstract_engine_params(engine_parts(config), jnp.bfloat16)
    count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    assert 2.28e9 < count < 2.30e9
    d = SamplingDefaults.from_config(config)
    assert (d.num_frames, d.num_steps, d.width, d.height, d.cfg_scale) == (25, 30, 1024, 576, 3.0)
    spec = SamplerSpec.create("euler_edm", d.num_steps, engine.sampler.discretization, guider=d.guider,
                              guider_options=dict(d.guider_options))
    run = functools.partial(_sample, engine=engine, spec=spec, num_frames=d.num_frames, decoding_t=d.decoding_t)
    out = jax.eval_shape(lambda p, image, key: run(params=p, image=image, key=key, scale=jnp.float32(3.0),
                                                   fps_id=jnp.float32(6), motion_bucket_id=jnp.float32(127),
                                                   cond_aug=jnp.float32(0.02)),
                         params, jax.ShapeDtypeStruct((1, 576, 1024, 3), jnp.float32), jax.random.key(0))
    assert out.shape == (25, 576, 1024, 3) and out.dtype == jnp.uint8


def demo_request_frames(tiny_svd) -> np.ndarray:
    """The library's frames for the demo tests' request: 4 frames at 8 fps (fps_id 7), motion 100."""
    pipeline = load_pipeline(tiny_svd["config"], tiny_svd["checkpoint"], config_label=str(CONFIG))
    return sample_video(pipeline, load_image(tiny_svd["init"], None, None, 16), num_frames=4, fps_id=7,
                        motion_bucket_id=100, cond_aug=0.02, seed=SEED, decoding_t=2)


def test_demo_makes_the_same_video_and_refuses_it_in_the_image_section(tiny_svd, tmp_path):
    """The demo's image-to-video section (DemoService.video, and its Gradio API "video") gives
    sample.py's frames; the image section names the right one instead of failing inside."""
    from sgm_jax.errors import UserError
    from sgm_jax.inference.service import DemoRequest, DemoService, ModelSource, VideoRequest
    from test_demo import live_client

    source = ModelSource.parse(f"{CONFIG}={tiny_svd['checkpoint']}")
    service = DemoService([source], tmp_path / "out")
    assert service.info(source.label)["video"]
    picture = np.asarray(Image.open(tiny_svd["init"]).convert("RGB"))
    paths, meta = service.video(VideoRequest(source.label, picture, num_frames=4, fps=8, motion_bucket_id=100,
                                             seed=SEED))
    assert [p.suffix for p in paths] == [".png"] * 4 + [".gif"] and meta["fps_id"] == 7
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:4]])
    want = demo_request_frames(tiny_svd)
    np.testing.assert_array_equal(frames, want)
    with pytest.raises(UserError, match="image-to-video section"):
        service.generate(DemoRequest(model=source.label, prompt="x"))
    with pytest.raises(UserError, match="needs an init image"):
        service.video(VideoRequest(source.label))

    from gradio_client import handle_file

    with live_client(service, tmp_path) as client:
        gif, shown_frames, api_meta, status = client.predict(
            source.label, handle_file(str(tiny_svd["init"])), 4, 8, 100, 0.02, None, SEED, api_name="/video")
    assert status.startswith("4 frames") and api_meta["motion_bucket_id"] == 100
    api_frames = np.stack([np.asarray(Image.open(f["image"]).convert("RGB")) for f in shown_frames])
    np.testing.assert_array_equal(api_frames, want)


def test_browser_makes_the_library_video(tiny_svd, tmp_path):
    """The demo's image-to-video section in a real headless Chromium: upload the frame, ask for 4
    frames at 8 fps, motion 100; the gallery shows the library's frames, pixel for pixel."""
    from sgm_jax.inference.service import DemoService, ModelSource
    from test_demo import ARTIFACTS, _fetch, browser_page

    service = DemoService([ModelSource.parse(f"{CONFIG}={tiny_svd['checkpoint']}")], tmp_path / "out")
    with browser_page(service, tmp_path, height=1400) as page:
        page.wait_for_selector("#video_generate", timeout=30000)
        page.locator("#video_init_image input[type=file]").set_input_files(str(tiny_svd["init"]))
        for field, value in (("frames", 4), ("fps", 8), ("motion_bucket_id", 100), ("seed", SEED)):
            page.locator(f"#video_{field} input").fill(str(value))
        page.locator("#video_generate").click()
        page.wait_for_function("document.querySelectorAll('#video_frames_gallery img').length == 4", timeout=120000)
        srcs = page.locator("#video_frames_gallery img").evaluate_all("els => els.map(e => e.src)")
        shown = np.stack([np.asarray(Image.open(_fetch(page, s)).convert("RGB")) for s in srcs])
        page.screenshot(path=str(ARTIFACTS / "demo_svd.png"), full_page=True)
    np.testing.assert_array_equal(shown, demo_request_frames(tiny_svd))
