"""Training you can watch: achieved TFLOP/s in the metrics, a profiler trace of chosen steps,
synthetic data for benchmarking, and grids whose content comes from the config."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sgm_jax.data import from_config
from sgm_jax.training.loop import train
from test_training import tiny_config


def test_synthetic_data_flops_profile_and_config_driven_grid(tmp_path):
    config = tiny_config(max_steps=4, log_every=2, sample_every=4, num_samples=6, sample_nrow=6,
                         sample_classes=(7, 2, 5), profile_steps=(1, 2))
    config.data = {"target": "synthetic", "params": {"batch_size": 8, "image_shape": [28, 28, 1], "keys": ["cls"],
                                                      "n_classes": 10}}
    summary = train(config, tmp_path / "run")
    assert summary["step"] == 4 and summary["data"] == "synthetic from generated: 28x28x1"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the step's FLOPs from XLA's cost analysis x steps/s: positive and far below any CPU's peak
    assert all(0 < r["tflops_per_device"] < 10 for r in rows), rows
    assert all(r["images_per_sec"] == r["steps_per_sec"] * 8 for r in rows)
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000004.png")
    assert grid.size == (6 * (56 + 2) + 2, 56 + 2 + 12 + 2)  # 6 tiles of 2x-scaled 28 px digits + labels

    # synthetic batches are a function of (seed, step): a resumed run sees the same data
    ds = from_config(config.data)
    a, b = next(ds.iterator(8, seed=0, start_step=3)), ds.batch_at(3, 8, 0)
    np.testing.assert_array_equal(a["jpg"], b["jpg"])
    assert a["jpg"].min() >= -1 and a["jpg"].max() <= 1 and set(np.unique(a["cls"])) <= set(range(10))


def test_config_eval_logs_metrics_during_training(tmp_path):
    """config.eval runs sgm_jax.evaluation's evaluators every training.eval_every steps (here the
    MNIST classifier on samples conditioned on sample_classes) and logs them as eval/<metric>."""
    config = tiny_config(max_steps=2, log_every=2, eval_every=2, sample_classes=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
    config.eval = {"metrics": ["classifier"], "num_samples": 20, "batch_size": 10, "seed": 0}
    train(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/class_accuracy" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert 0.0 <= evals[0]["eval/class_accuracy"] <= 1.0 and evals[0]["eval/num_images"] == 20


def test_grid_labels_wrap_to_the_tile_width():
    from PIL import ImageDraw

    from sgm_jax.images import LINE_H, MAX_LINES, _wrap, make_grid

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(draw, "a photo of the number seven", 60)
    assert len(lines) > 1 and all(draw.textlength(x) <= 60 for x in lines)
    assert " ".join(lines) == "a photo of the number seven"
    long_word = _wrap(draw, "x" * 20, 30)
    assert len(long_word) > 1 and "".join(long_word) == "x" * 20 and all(draw.textlength(x) <= 30 for x in long_word)
    assert len(_wrap(draw, "word " * 50, 30)) == MAX_LINES
    images = np.zeros((2, 32, 32, 1), np.float32)
    n_lines = len(_wrap(draw, "a photo of the number seven", 30))
    grid = make_grid(images, 2, ["a photo of the number seven", "7"])
    assert grid.size == (2 * 34 + 2, 32 + 2 + LINE_H * n_lines + 1 + 2)
    assert make_grid(images, 2, ["0", "1"]).size == (70, 32 + 2 + 12 + 2)  # one line: as before wrapping
