"""Training building blocks shared by the latent and text-to-image configs, each mirroring a
section of the seed's configs/example_training/*.yaml (`target` + `params`, the seed's names)."""

from __future__ import annotations

from typing import Any, Sequence

from sgm_jax.configs import training_defaults
from sgm_jax.configs.inference import _parts as P

SEED = P.SEED


def eps_loss() -> dict[str, Any]:
    """StandardDiffusionLoss with EpsWeighting over DiscreteSampling's 1000 LegacyDDPM sigmas."""
    return {"target": f"{SEED}.loss.StandardDiffusionLoss", "params": {
        "loss_weighting_config": {"target": f"{SEED}.loss_weighting.EpsWeighting"},
        "sigma_sampler_config": {"target": f"{SEED}.sigma_sampling.DiscreteSampling", "params": {
            "num_idx": 1000,
            "discretization_config": {"target": f"{SEED}.discretizer.LegacyDDPMDiscretization"}}}}}


def euler_sampler(num_steps: int = 50, scale: float = 5.0, discretization: str = "LegacyDDPMDiscretization"
                  ) -> dict[str, Any]:
    return {"target": f"{SEED}.sampling.EulerEDMSampler", "params": {
        "num_steps": num_steps,
        "discretization_config": {"target": f"{SEED}.discretizer.{discretization}"},
        "guider_config": {"target": f"{SEED}.guiders.VanillaCFG", "params": {"scale": scale}}}}


def lambda_linear(warm_up_steps: int = 10000) -> dict[str, Any]:
    """The seed's scheduler_config: linear warm-up from 1e-6 x lr, then constant."""
    return {"target": "sgm.lr_scheduler.LambdaLinearScheduler", "params": {
        "warm_up_steps": [warm_up_steps], "cycle_lengths": [10000000000000], "f_start": [1.e-6], "f_max": [1.],
        "f_min": [1.]}}


def image_datapipeline(size: int, urls: str | Sequence[str] = "", *, required_keys: Sequence[str] = ("jpg", "txt"),
                       aspect_buckets: Sequence[Sequence[int]] = (), crop_params: dict | None = None,
                       decoder: str = "pil", shuffle: int = 10000) -> dict[str, Any]:
    """The seed's datapipeline: Resize(size, bicubic), ToTensor, Rescaler to [-1, 1],
    AddOriginalImageSizeAsTupleAndCropToSquare (SDXL's size and crop keys)."""
    crop = {"target": "sdata.mappers.AddOriginalImageSizeAsTupleAndCropToSquare"}
    if crop_params:
        crop["params"] = crop_params
    return {
        "urls": urls,  # USER: shard paths, globs, brace patterns, folders, gs://...
        "pipeline_config": {"shardshuffle": shuffle, "sample_shuffle": shuffle, "required_keys": list(required_keys),
                            "skip_bad_samples": True, "aspect_buckets": [list(b) for b in aspect_buckets],
                            # 0: one stream per host; S: the same batches on any host count dividing S
                            "num_streams": 0},
        "decoders": [decoder],
        "preencoded": False,  # True: urls are shards of python -m sgm_jax.cli.preencode (postprocessors done)
        "postprocessors": [
            {"target": "sdata.mappers.TorchVisionImageTransforms", "params": {"key": "jpg", "transforms": [
                {"target": "torchvision.transforms.Resize", "params": {"size": size, "interpolation": 3}},
                {"target": "torchvision.transforms.ToTensor"}]}},
            {"target": "sdata.mappers.Rescaler"},
            crop,
        ],
    }


def streaming_data(datapipeline: dict[str, Any], batch_size: int, num_workers: int = 6) -> dict[str, Any]:
    return {"target": "sgm.data.dataset.StableDataModuleFromConfig", "params": {"train": {
        "datapipeline": datapipeline, "loader": {"batch_size": batch_size, "num_workers": num_workers}}},
        "allow_changed_shards": False}  # True: resume on shards replaced under their names, with a warning


def seed_lightning_training(name: str, **overrides: Any) -> dict[str, Any]:
    """The example yamls' lightning section: checkpoints every 5000 steps, 8 images every 1000 in
    rows of 2, 1000 epochs (a stream has none: max_steps decides), bf16 compute on accelerators."""
    t = training_defaults.training(name=name, max_epochs=1000, max_steps=1_000_000, checkpoint_every=5000,
                                   checkpoint_async=True, sample_every=1000, num_samples=8, sample_nrow=2,
                                   log_every=100, dtype="bfloat16")
    t.update(overrides)
    return t
