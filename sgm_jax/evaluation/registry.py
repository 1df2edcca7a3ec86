"""The evaluators and how to build them by name: `fid`, `clip_score`, `classifier`,
`reconstruction`. Each is called as `evaluator(images, conditioning) -> {metric: float}` with
images `[N, H, W, C]` (uint8 0..255 or float -1..1) and conditioning a list of class ids or
prompts (or None); `evaluator.needs` says which conditioning it reads ("classes", "prompts"
or None).

    evaluators = build_evaluators(["fid", "classifier"], EvalOptions(ref="mnist:test"))
    metrics = evaluate_images(evaluators, images, classes)   # {"fid": ..., "class_accuracy": ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from sgm_jax import multihost
from sgm_jax.convert.inception import load_inception_params
from sgm_jax.evaluation import fid as fid_lib
from sgm_jax.evaluation.checks import check_conditioning
from sgm_jax.evaluation.classifier import ClassifierEvaluator
from sgm_jax.evaluation.clip_score import CLIPScore, load_clip_score_params
from sgm_jax.evaluation.images import is_split_reference, load_image_folder, load_split
from sgm_jax.evaluation.reconstruction import ReconstructionEvaluator


@dataclasses.dataclass
class EvalOptions:
    """ref: reference images for FID / reconstruction: a folder, a `.npz` of FID statistics
    (`mu`, `sigma`, pytorch-fid's format) or `<dataset>:<split>[:<data path>]` (e.g. `mnist:test`);
    ref_limit: at most this many reference images; batch_size: images per Inception / CLIP call;
    inception_weights / clip_weights / tokenizer: files (None: the default search places);
    classifier_data: the MNIST folder the classifier trains on (None: the usual search);
    save_ref_stats: write the reference FID statistics here (.npz)."""

    ref: str | None = None
    ref_limit: int | None = None
    batch_size: int = 64
    inception_weights: str | None = None
    clip_weights: str | None = None
    tokenizer: str | None = None
    classifier_data: str | None = None
    save_ref_stats: str | None = None


def load_reference_images(ref: str, limit: int | None = None) -> tuple[np.ndarray, list[Any]]:
    """uint8 images and conditioning of a folder or `<dataset>:<split>` reference."""
    if is_split_reference(ref):
        return load_split(ref, limit)
    return load_image_folder(ref, limit)


class FIDEvaluator:
    """`{"fid": distance}` between the images' Inception statistics and the reference's."""

    name, needs = "fid", None

    def __init__(self, features: fid_lib.InceptionFeatures, reference: fid_lib.GaussianStats):
        self.features, self.reference = features, reference

    def __call__(self, images: np.ndarray, conditioning: Any = None) -> dict[str, float]:
        return self.from_rows(self.rows(images, conditioning))

    def rows(self, images: np.ndarray, conditioning: Any = None) -> np.ndarray:
        """Per-image Inception features [N, 2048]: what each host computes of its share."""
        return self.features(images)

    def from_rows(self, features: np.ndarray) -> dict[str, float]:
        stats = fid_lib.GaussianStats.from_features(features)
        return {"fid": fid_lib.frechet_distance_stats(stats, self.reference)}


def build_fid(options: EvalOptions) -> FIDEvaluator:
    if not options.ref:
        raise ValueError("FID needs reference images or statistics: give --ref DIR|stats.npz|mnist:test")
    stats = fid_lib.load_statistics(options.ref) if str(options.ref).endswith(".npz") else None  # before the weights
    features = fid_lib.InceptionFeatures(load_inception_params(options.inception_weights), options.batch_size)
    if stats is not None:
        reference = fid_lib.GaussianStats(*stats)
    else:
        images, _ = load_reference_images(options.ref, options.ref_limit)
        reference = fid_lib.GaussianStats.from_features(features(images))
    if options.save_ref_stats:
        fid_lib.save_statistics(options.save_ref_stats, reference.mu, reference.sigma)
    return FIDEvaluator(features, reference)


class CLIPScoreEvaluator:
    """`{"clip_score": mean 100 * max(cos, 0)}` of images against their prompts."""

    name, needs = "clip_score", "prompts"

    def __init__(self, scorer: Any):
        self.scorer = scorer

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None) -> dict[str, float]:
        check_conditioning(self, prompts, len(images))
        return {"clip_score": self.scorer(images, list(prompts))}


def build_clip_score(options: EvalOptions) -> CLIPScoreEvaluator:
    # transformers is heavy and, without torch, prints a line on import: only text models need it
    from sgm_jax.nn.tokenizer import load_tokenizer

    params = load_clip_score_params(options.clip_weights)
    return CLIPScoreEvaluator(CLIPScore(params, load_tokenizer(options.tokenizer), batch_size=options.batch_size))


def build_classifier(options: EvalOptions) -> Any:
    return ClassifierEvaluator.from_mnist(options.classifier_data)


def build_reconstruction(options: EvalOptions) -> Any:
    if not options.ref or str(options.ref).endswith(".npz"):
        raise ValueError("reconstruction metrics compare image pairs: --ref must be a folder or <dataset>:<split>")
    return ReconstructionEvaluator(load_reference_images(options.ref, options.ref_limit)[0])


EVALUATORS: dict[str, Callable[[EvalOptions], Any]] = {
    "fid": build_fid,
    "clip_score": build_clip_score,
    "classifier": build_classifier,
    "reconstruction": build_reconstruction,
}


def build_evaluators(metrics: Sequence[str], options: EvalOptions) -> list[Any]:
    unknown = [m for m in metrics if m not in EVALUATORS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or metrics}: choose from {sorted(EVALUATORS)}")
    return [EVALUATORS[m](options) for m in metrics]


def evaluate_images(evaluators: Sequence[Any], images: np.ndarray,
                    conditioning: Sequence[Any] | None) -> dict[str, float]:
    """Every evaluator's metrics on one image set, merged, plus `num_images`.

    On several hosts `images` / `conditioning` are this host's share, and the metrics (the same
    on every host) are those of all hosts' images: an evaluator with per-image `rows` (FID's
    features) computes them on its share and the rows are gathered; the others see the
    gathered images."""
    for evaluator in evaluators:
        check_conditioning(evaluator, conditioning, len(images))
    everything: tuple[np.ndarray, Any] | None = None
    metrics: dict[str, float] = {"num_images": float(sum(multihost.gather_json(len(images))))}
    for evaluator in evaluators:
        if hasattr(evaluator, "rows"):
            metrics.update(evaluator.from_rows(multihost.gather_rows(evaluator.rows(images, conditioning))))
            continue
        if everything is None:
            everything = (multihost.gather_rows(images), None if conditioning is None else
                          [c for host in multihost.gather_json(_json_conditions(conditioning)) for c in host])
        metrics.update(evaluator(*everything))
    return metrics


def _json_conditions(conditioning: Sequence[Any]) -> list[Any]:
    return [int(c) if isinstance(c, (int, np.integer)) else c for c in conditioning]

