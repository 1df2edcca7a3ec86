"""The seed's invisible watermark (sgm_jax.inference.watermark) on real photographs, its parity with
the invisible-watermark package's own EmbedMaxDct (loaded without torch) where that is installed, and
its use: every PNG that sample.py and the demo save (outputs.py), unless turned off."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import JAX_CACHE, REPO
from test_inference import BPE, write_random_checkpoint

from sgm_jax.cli.configs import load_config
from sgm_jax.cli.demo import build_parser, make_service
from sgm_jax.convert.checkpoint import convert_file
from sgm_jax.inference import watermark as wm
from sgm_jax.inference.outputs import UNSTAMPED, Watermark, save_grid, save_images
from sgm_jax.inference.service import DemoRequest

skdata = pytest.importorskip("skimage.data")

BITS = wm.WATERMARK_BITS.astype(bool)
TURBO, PROMPT = "inference/tiny_sdxl_turbo", "a cinematic shot of a baby racoon"


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] scikit-image photo, bicubic-resized to (width, height) when given."""
    image = getattr(skdata, name)()[..., :3]
    return image if size is None else np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / err))


def test_bits_are_the_seeds_message():
    assert wm.WATERMARK_BITS.shape == (48,)
    assert np.packbits(wm.WATERMARK_BITS).tobytes() == bytes.fromhex("B3EC907BB19E")


# chelsea keeps its own 300 x 451: not square, width neither a multiple of 4 (the stamp's crop)
# nor of 8 (cv2's scalar colour path)
@pytest.mark.parametrize("name,size", [("astronaut", (512, 512)), ("chelsea", None)])
def test_round_trip_reads_back_every_bit(name, size):
    x = photo(name, size).astype(np.float32) / 255
    stamped = wm.embed_watermark(x)
    assert stamped.shape == x.shape and stamped.dtype == np.float32
    assert stamped.min() >= 0 and stamped.max() <= 1
    np.testing.assert_array_equal(wm.read_watermark(stamped), BITS)
    assert wm.matches(stamped) == 1.0
    # a batch is each image on its own; float64 in, float64 out
    batch = wm.embed_watermark(np.stack([x, x]).astype(np.float64))
    assert batch.dtype == np.float64
    np.testing.assert_array_equal(batch[1], stamped.astype(np.float64))
    np.testing.assert_array_equal(wm.matches(batch), [1.0, 1.0])


def test_saved_png_reads_back_every_bit(tmp_path, capsys):
    """uint8 in = the seed's saved PNG; read as its detect.py reads a file (uint8 YUV)."""
    image = photo("rocket", (512, 512))
    stamped = wm.embed_watermark(image)
    assert stamped.dtype == np.uint8 and stamped.shape == image.shape
    path = tmp_path / "rocket.png"
    Image.fromarray(stamped).save(path)
    assert wm.matches(np.asarray(Image.open(path))) == 1.0
    with pytest.raises(SystemExit) as exit_:
        wm.main([str(path)])
    assert exit_.value.code == 0
    assert "1.000 of the watermark's bits match (48/48): very likely watermarked" in capsys.readouterr().out


@pytest.mark.parametrize("name,size,low", [("astronaut", (512, 512), 37.0), ("chelsea", None, 39.5),
                                           ("coffee", (512, 512), 38.0)])
def test_stamp_is_faint(name, size, low):
    """PSNR of the saved (uint8) stamped photo against the photo: 37.1, 40.0 and 38.5 dB measured."""
    image = photo(name, size)
    stamped = wm.embed_watermark(image)
    assert (stamped != image).any()
    assert low < psnr(stamped, image) < 45.0


def test_unstamped_photos_match_at_chance():
    fractions = [wm.matches(photo(name, (512, 512))) for name in ("astronaut", "chelsea", "coffee")]
    # each at most the seed's "partial match" bound (33 of 48 bits), together about one half
    assert max(fractions) <= 33 / 48, fractions
    assert 0.35 < np.mean(fractions) < 0.65, fractions
    assert wm.verdict(min(fractions)) == "no watermark detected"


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="200x200 is too small"):
        wm.embed_watermark(np.zeros((200, 200, 3), np.uint8))
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        wm.read_watermark(np.zeros((512, 512, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        wm.matches(np.zeros((512, 512, 3), np.int32))
    (tmp_path / "bad.png").write_text("not a png")
    for name, message in (("missing.png", "no such file"), ("bad.png", "not an image file that PIL can read")):
        with pytest.raises(SystemExit) as exit_:
            wm.main([str(tmp_path / name)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_runs_without_torch_opencv_or_the_package():
    """torch is a test-only peer: the stamp must work where torch, cv2 and imwatermark cannot import."""
    code = ("import sys; sys.modules.update(torch=None, cv2=None, imwatermark=None); import numpy as np; "
            "from sgm_jax.inference.watermark import embed_watermark, matches; "
            "print(matches(embed_watermark(np.full((256, 256, 3), 0.5, np.float32))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"


def _package_maxdct():
    """imwatermark/maxDct.py, executed on its own: the package's __init__ imports torch (rivaGan)."""
    spec = importlib.util.find_spec("imwatermark")  # a top-level spec is found without importing it
    if spec is None or spec.origin is None:
        pytest.skip("invisible-watermark is not installed (pip install --no-deps invisible-watermark "
                    "opencv-python-headless): no parity check against the seed's watermark package")
    pytest.importorskip("cv2", reason="the invisible-watermark package needs OpenCV (opencv-python-headless)")
    path = Path(spec.origin).parent / "maxDct.py"
    module_spec = importlib.util.spec_from_file_location("_imwatermark_maxdct", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _cv2_rounds_like_us(bgr: np.ndarray) -> bool:
    """Whether this cv2 build gives our float32 Y, U, V for `bgr` bit for bit. cv2's colour kernels
    use fused multiply-adds on AVX2 and sum a row's last W % 8 pixels in another order; ours follow
    cv2 4.6 (the seed's pin) and 5.0 there. A CPU without FMA, or cv2 4.1x (whose vector loop also
    covers the tail), rounds some of them in the last float32 bit."""
    import cv2

    ref = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    return all(np.array_equal(ours, ref[..., k]) for k, ours in enumerate(wm._bgr_to_yuv_float(bgr)))


@pytest.mark.parametrize("name,size", [("astronaut", (512, 512)), ("chelsea", None), ("coffee", (512, 512))])
def test_parity_with_the_package(name, size):
    """The seed's WatermarkEmbedder steps around EmbedMaxDct.encode: float32 255 * x as BGR in,
    RGB / 255 clamped out; its perform_save_locally then truncates 255 * y to uint8."""
    maxdct = _package_maxdct()
    image = photo(name, size)
    x = image.astype(np.float32) / 255
    bgr = np.ascontiguousarray((255 * x)[..., ::-1])
    seed = np.clip(maxdct.EmbedMaxDct([int(b) for b in BITS], wmLen=48).encode(bgr)[..., ::-1] / np.float32(255), 0, 1)
    saved = (255.0 * seed).astype(np.uint8)
    ours, ours_u8 = wm.embed_watermark(x), wm.embed_watermark(image)
    if _cv2_rounds_like_us(bgr):  # bit for bit: the same float32 operations in the same order, and pywt itself
        np.testing.assert_array_equal(ours, seed)
        np.testing.assert_array_equal(ours_u8, saved)
    else:  # a last-bit difference in Y can move a block's peak or quantisation step; rarely
        assert np.mean(np.abs(ours - seed) <= 1e-6) > 0.999
        assert np.mean(ours_u8 == saved) > 0.999
    decoder = maxdct.EmbedMaxDct([], wmLen=48)
    # reading: uint8 as detect.py's cv2.imread gives it, float as the stamping saw it
    np.testing.assert_array_equal(wm.read_watermark(saved), decoder.decode(np.ascontiguousarray(saved[..., ::-1])))
    np.testing.assert_array_equal(wm.read_watermark(image), decoder.decode(np.ascontiguousarray(image[..., ::-1])))
    np.testing.assert_array_equal(wm.read_watermark(x), decoder.decode(bgr))


def test_yuv_is_cv2s():
    """uint8 (how the seed's PNGs are read): cv2's fixed point, exactly. float32 on a row width of
    whole vectors: cv2's AVX2 kernel exactly, where the CPU has AVX2 and FMA."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is not installed: nothing to compare with")
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(wm._u_uint8(bgr), cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)[..., 1])
    avx2, fma3 = 11, 12  # OpenCV's CV_CPU_AVX2 and CV_CPU_FMA3 (the Python module has no names for them)
    if not (cv2.checkHardwareSupport(avx2) and cv2.checkHardwareSupport(fma3)):
        pytest.skip("this CPU lacks AVX2 + FMA: cv2's float colour kernel rounds otherwise than ours")
    assert _cv2_rounds_like_us(rng.random((64, 512, 3), dtype=np.float32) * 255)


# ----------------------------------------------------------------------------- saving: sample.py and the demo


def saved(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """A PNG's pixels (uint8 [H, W, C] as written) and its text metadata."""
    with Image.open(path) as im:
        return np.asarray(im), dict(im.text)


def test_saved_pngs_are_stamped_unless_turned_off(tmp_path):
    images = np.stack([photo("rocket", (512, 512)), photo("astronaut", (512, 512))])
    stamped = wm.embed_watermark(images)
    paths = save_images(images, [tmp_path / "a.png", tmp_path / "b.png"], {"seed": 1})  # default: on
    for k, path in enumerate(paths):
        pixels, text = saved(path)
        np.testing.assert_array_equal(pixels, stamped[k])
        assert (text["watermark"], text["index"], text["seed"]) == (wm.STAMP_NAME, str(k), "1")
    # read as the seed's detect.py reads a PNG: rocket 48/48, astronaut 38/48 measured (the module's
    # docstring: how well it reads back depends on the image)
    assert wm.matches(saved(paths[0])[0]) == 1.0
    assert wm.matches(saved(paths[1])[0]) >= 36 / 48  # the seed's "very likely watermarked"
    off = save_images(images, [tmp_path / "c.png", tmp_path / "d.png"], {}, watermark=Watermark(enabled=False))
    for k, path in enumerate(off):
        pixels, text = saved(path)
        np.testing.assert_array_equal(pixels, images[k])
        assert text["watermark"] == UNSTAMPED


def test_grid_tiles_are_stamped_before_the_grid_is_assembled(tmp_path):
    images = np.stack([photo("rocket", (512, 512)), photo("rocket", (512, 512))[:, ::-1]])
    stamped = wm.embed_watermark(images)
    pixels, text = saved(save_grid(images, tmp_path / "grid.png", 2, {}))
    pad, size = 2, 512  # make_grid's border; tiles over 64 px are pasted at scale 1
    tiles = [pixels[pad:pad + size, pad + k * (size + pad):pad + k * (size + pad) + size] for k in range(2)]
    for tile, want in zip(tiles, stamped):
        np.testing.assert_array_equal(tile, want)
    assert wm.matches(tiles[0]) == 1.0
    assert (text["watermark"], text["images"]) == (wm.STAMP_NAME, "2")


def test_small_or_greyscale_images_are_saved_as_they_are_and_said_once(tmp_path, capsys):
    """MNIST's 28x28 samples (the seed would never stamp them): no failure, one line per run."""
    rng = np.random.default_rng(0)
    mnist, grey = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((2, 28, 28, 1), (2, 256, 256, 1)))
    stamp = Watermark()  # one run: sample.py writes block by block
    for block in range(2):
        for k, path in enumerate(save_images(mnist, [tmp_path / f"{block}_{k}.png" for k in range(2)], {},
                                             watermark=stamp)):
            pixels, text = saved(path)
            np.testing.assert_array_equal(pixels, mnist[k, ..., 0])
            assert text["watermark"] == "none (28x28, too small)"
    pixels, text = saved(save_grid(grey, tmp_path / "grey.png", 2, {}, watermark=stamp))
    np.testing.assert_array_equal(pixels[2:258, 2:258], np.repeat(grey[0], 3, axis=-1))
    assert text["watermark"] == "none (256x256, greyscale)"
    tail = ": the seed's invisible watermark needs RGB images of 256x256 pixels or more"
    assert capsys.readouterr().out.splitlines() == [f"watermark: images saved unstamped (28x28, too small){tail}",
                                                    f"watermark: images saved unstamped (256x256, greyscale){tail}"]


@pytest.fixture(scope="module")
def turbo(tmp_path_factory) -> Path:
    """tiny_sdxl_turbo (one step, no guidance) with random weights, converted; its metadata names the
    config, so the demo takes the folder alone."""
    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary {BPE} absent (../shared/data/clip)")
    root = tmp_path_factory.mktemp("turbo")
    config = load_config(TURBO)
    checkpoint = write_random_checkpoint(config, root / "turbo.safetensors", 3)
    return convert_file(checkpoint, config, root / "tiny_sdxl_turbo", metadata={"config": TURBO})


def test_sample_py_stamps_its_pngs_and_the_demo_saves_the_same_pixels(turbo, tmp_path, monkeypatch, capsys):
    """256x256 random-weight samples: sample.py's PNG (a real command line) reads back 45/48 bits
    measured; --no-watermark gives the samples themselves; the demo's service gives both, pixel for pixel."""
    import sample

    monkeypatch.setenv("SGM_JAX_CLIP_BPE", str(BPE))
    request = ["--config", TURBO, "--checkpoint", str(turbo), "--prompt", PROMPT, "--width", "256", "--height",
               "256", "--num", "1", "--seed", "5", "--cache-dir", str(JAX_CACHE)]
    run = subprocess.run([sys.executable, str(REPO / "sample.py"), *request, "--out", str(tmp_path / "on.png")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "watermark:" not in run.stdout  # nothing skipped
    on, on_text = saved(tmp_path / "on.png")
    assert sample.main([*request, "--no-watermark", "--out", str(tmp_path / "off.png")]) == 0
    off, off_text = saved(tmp_path / "off.png")
    assert (on_text["watermark"], off_text["watermark"]) == (wm.STAMP_NAME, UNSTAMPED)
    np.testing.assert_array_equal(wm.embed_watermark(off), on)  # the stamp, and nothing else, between them
    matched = int((wm.read_watermark(on) == BITS).sum())
    assert matched >= 36, matched  # the seed's "very likely watermarked" (> 35 of 48)
    assert int((wm.read_watermark(off) == BITS).sum()) <= 33  # no watermark: about half the bits, by chance
    on_demo = make_service([str(turbo)], out=str(tmp_path / "demo"))
    off_demo = make_service([str(turbo)], out=str(tmp_path / "demo_off"), watermark=False)
    off_demo.cache = on_demo.cache  # the weights and compiled loop loaded once
    for service, want in ((on_demo, on), (off_demo, off)):
        label = next(iter(service.sources))
        paths, _ = service.generate(DemoRequest(model=label, prompt=PROMPT, width=256, height=256, seed=5, num=1))
        np.testing.assert_array_equal(saved(paths[0])[0], want)
    assert build_parser().parse_args(["--no-watermark"]).no_watermark
