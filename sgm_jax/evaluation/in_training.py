"""Evaluation inside the training loop (`config.eval`): the same evaluators as evaluate.py,
built once (weights loaded, reference statistics computed) and run every `every` steps.

    evaluator = make_training_evaluator(config.eval, image_shape)   # None when evaluation is off
    ...
    if evaluator is not None and step % evaluator.every == 0:
        metrics = evaluator(generate, step)   # {"fid": ..., "class_accuracy": ..., "seconds": ...}

The keys carry no prefix: the loop writes task.evaluate()'s dict as "eval/<key>" already.

`generate(n, seed) -> (images, conditioning)`: n samples of the model being trained, images
`[n, H, W, C]` float in [-1, 1] (or uint8), conditioning a list of n class ids or prompts (or
None for an unconditional model). The evaluator calls it with the same seed every time, so the
numbers of successive evaluations differ by the model only.

eval_config fields (a ConfigDict or dict; defaults in brackets):
  every [0]           evaluate every N steps; 0 turns evaluation off.
  num_samples [500]   images generated per evaluation (FID needs >= 2; hundreds for a usable value).
  metrics [["fid"]]   names from sgm_jax.evaluation.registry.EVALUATORS: "fid", "classifier" (MNIST
                      class accuracy; 28x28x1 models), "clip_score" (text-conditional models),
                      "reconstruction" (paired: generated image i vs reference image i).
  ref [""]            FID / reconstruction reference: an image folder, a pytorch-fid `.npz` of
                      statistics, or "<dataset>:<split>[:<data path>]", e.g. "mnist:test".
  ref_limit [None]    use at most this many reference images. The reference statistics are
                      computed when the evaluator is built (on a CPU about 0.1-0.3 s per image
                      at 299x299): for large references compute them once with
                      `evaluate.py --ref REF --save-ref-stats ref.npz` and give the .npz.
  batch_size [64]     images per Inception / CLIP call (split over all local devices).
  seed [0]            the seed passed to generate.
  inception_weights, clip_weights, tokenizer, classifier_data [None]: files; None searches the
                      default places (see sgm_jax.convert.inception / clip_vision, sgm_jax.data).
A missing weight file fails when the evaluator is built (at start-up), with the one line that
says which file to put where.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sgm_jax.evaluation.registry import EvalOptions, build_evaluators, evaluate_images

Generate = Callable[[int, int], tuple[np.ndarray, Sequence[Any] | None]]

DEFAULTS: dict[str, Any] = {"every": 0, "num_samples": 500, "metrics": ("fid",), "ref": "", "ref_limit": None,
                            "batch_size": 64, "seed": 0, "inception_weights": None, "clip_weights": None,
                            "tokenizer": None, "classifier_data": None}


class TrainingEvaluator:
    """`evaluator(generate, step) -> {"<metric>": float, ..., "num_images", "seconds"}`."""

    def __init__(self, evaluators: Sequence[Any], every: int, num_samples: int, seed: int):
        self.evaluators, self.every, self.num_samples, self.seed = list(evaluators), every, num_samples, seed

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def __call__(self, generate: Generate, step: int) -> dict[str, float]:
        t0 = time.time()
        images, conditioning = generate(self.num_samples, self.seed)
        if len(images) != self.num_samples:
            raise ValueError(f"generate({self.num_samples}, ...) returned {len(images)} images")
        metrics = evaluate_images(self.evaluators, np.asarray(images), conditioning)
        out = {k: float(v) for k, v in metrics.items()}
        out["seconds"] = time.time() - t0
        return out


def _settings(eval_config: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(eval_config.to_dict() if hasattr(eval_config, "to_dict") else (eval_config or {}))
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.eval: unknown field(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def make_training_evaluator(eval_config: Mapping[str, Any] | None,
                            image_shape: Sequence[int]) -> TrainingEvaluator | None:
    """The evaluator `config.eval` describes for a model generating `image_shape` (H, W, C)
    images, or None when evaluation is off (`every` 0 or no metrics)."""
    s = _settings(eval_config)
    metrics = [m for m in (s["metrics"].split(",") if isinstance(s["metrics"], str) else s["metrics"]) if m]
    if int(s["every"]) <= 0 or not metrics:
        return None
    if "classifier" in metrics and tuple(image_shape)[-3:] != (28, 28, 1):
        raise ValueError(f"config.eval: the classifier metric scores 28x28x1 MNIST digits, this model makes "
                         f"{tuple(image_shape)} images")
    if int(s["num_samples"]) < 2:
        raise ValueError("config.eval.num_samples must be at least 2")
    options = EvalOptions(ref=s["ref"] or None, ref_limit=s["ref_limit"], batch_size=int(s["batch_size"]),
                          inception_weights=s["inception_weights"], clip_weights=s["clip_weights"],
                          tokenizer=s["tokenizer"], classifier_data=s["classifier_data"])
    return TrainingEvaluator(build_evaluators(metrics, options), int(s["every"]), int(s["num_samples"]),
                             int(s["seed"]))
