"""evaluate.py: metrics of generated images against real ones, printed and written as JSON.

    python evaluate.py --workdir workdir/mnist_cond_cpu --classes 0,1,2,3,4,5,6,7,8,9 --num 1000 \
        --metrics fid,classifier --ref mnist:test
    python evaluate.py --images samples/ --ref real_images/ --metrics fid --save-ref-stats real.npz
    python evaluate.py --images samples/ --ref real.npz --metrics fid,clip_score   # prompts from PNG metadata
    python evaluate.py --ref mnist:test --save-ref-stats mnist_test.npz               # reference statistics only

`--workdir` samples a train.py run (class ids or prompts, the chosen sampler); `--images` reads
a folder (conditioning from each PNG's `class` / `prompt` metadata or `--captions FILE`). `--ref`
is a folder, pytorch-fid `.npz` statistics or `<dataset>:<split>`. Metrics: see
sgm_jax.evaluation.registry. FID needs pytorch-fid's InceptionV3 weights, the CLIP score
CLIP ViT-L/14's; when absent, the error line says which file to put where.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from sgm_jax import multihost
from sgm_jax.errors import UserError
from sgm_jax.evaluation.images import load_image_folder, save_image_folder
from sgm_jax.evaluation.registry import (
    EVALUATORS,
    EvalOptions,
    build_evaluators,
    evaluate_images,
)
from sgm_jax.inference.workdir import TrainedModel

from . import distributed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="a train.py workdir to sample from")
    src.add_argument("--images", help="a folder of images to evaluate")
    p.add_argument("--ref", help="reference: image folder, FID statistics .npz, or <dataset>:<split> (mnist:test)")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, from {','.join(EVALUATORS)}")
    p.add_argument("--classes", help="--workdir: class ids to sample, e.g. 0,1,2")
    p.add_argument("--prompts", help="--workdir: a text file of prompts, one per line")
    p.add_argument("--captions", help="--images: a text file with one class id or prompt per image (sorted names)")
    p.add_argument("--num", type=int, default=100, help="--workdir: images in all (a multiple of the conditions)")
    p.add_argument("--sampler", help="--workdir: sampler name (default: the workdir's)")
    p.add_argument("--steps", type=int, help="--workdir: sampling steps")
    p.add_argument("--cfg-scale", type=float, help="--workdir: classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-samples", help="--workdir: also write the samples as PNGs to this folder")
    p.add_argument("--limit", type=int, help="--images: evaluate at most this many images")
    p.add_argument("--ref-limit", type=int, help="use at most this many reference images")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception / CLIP call")
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or exported)")
    p.add_argument("--clip-weights", help="CLIP ViT-L/14 model.safetensors (transformers) or folder")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder or BPE file (default: the usual places)")
    p.add_argument("--classifier-data", help="MNIST IDX folder the classifier trains on (default: search)")
    p.add_argument("--save-ref-stats", help="write the reference FID statistics (.npz) here")
    p.add_argument("--out", help="JSON output (default: <workdir>/evaluation.json or <images>_metrics.json)")
    distributed.add_flags(p)
    return p


def _read_lines(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _as_condition(value: str) -> Any:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def generate_from_workdir(workdir: str, conditions: Sequence[Any], num: int, *, sampler: str | None = None,
                          steps: int | None = None, cfg_scale: float | None = None,
                          seed: int = 0) -> tuple[np.ndarray, list[Any]]:
    """`num` samples of a train.py workdir, condition-major (num / len(conditions) each):
    (uint8 or float images `[num, H, W, C]`, the condition of each image)."""
    conditions = list(conditions) or [None]
    if num % len(conditions):
        raise UserError(f"--num {num} is not a multiple of the {len(conditions)} classes / prompts")
    per = num // len(conditions)
    labels = [c for c in conditions for _ in range(per)]
    model = TrainedModel.load(workdir)
    used = conditions if model.conditional else []
    # several hosts: each samples a contiguous share of the compiled batches (noise depends on the image index)
    batch = model.batch_size(num)
    mine = multihost.host_share(-(-num // batch))
    start, stop = mine.start * batch, min(mine.stop * batch, num)
    if start >= stop:
        return np.zeros((0, *model.image_shape), np.uint8), []
    result = model.sample(used, num=per, seed=seed, spec=model.spec(sampler, steps), cfg_scale=cfg_scale,
                          batch_size=batch, start=start, count=stop - start)
    return np.asarray(result.images), labels[start:stop]


def real_main(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    options = EvalOptions(ref=args.ref, ref_limit=args.ref_limit, batch_size=args.batch_size,
                          inception_weights=args.inception_weights, clip_weights=args.clip_weights,
                          tokenizer=args.tokenizer, classifier_data=args.classifier_data,
                          save_ref_stats=args.save_ref_stats)
    if not (args.workdir or args.images) and not (args.save_ref_stats and metrics == ["fid"]):
        raise UserError("give --workdir W or --images DIR (or only --ref REF --save-ref-stats OUT.npz "
                        "to compute reference FID statistics)")
    distributed.start(args)  # before any other JAX call
    t0 = time.time()
    evaluators = build_evaluators(metrics, options)  # weights and references first: fail before sampling
    if not (args.workdir or args.images):
        print(f"wrote FID statistics of {args.ref} to {args.save_ref_stats}")
        return 0
    if args.workdir:
        if args.classes and args.prompts:
            raise UserError("give --classes or --prompts, not both")
        conditions: list[Any] = [int(c) for c in args.classes.split(",")] if args.classes else []
        conditions = _read_lines(args.prompts) if args.prompts else conditions
        images, conditioning = generate_from_workdir(args.workdir, conditions, args.num, sampler=args.sampler,
                                                     steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
        if args.save_samples:  # each host its own images, named by their index in the request
            first = multihost.gather_json(len(images))[: jax.process_index()]
            save_image_folder(args.save_samples, images, conditioning, start=sum(first))
        out = Path(args.out or Path(args.workdir) / "evaluation.json")
    else:
        images, conditioning = load_image_folder(args.images, args.limit)
        if args.captions:
            captions = [_as_condition(c) for c in _read_lines(args.captions)]
            if len(captions) < len(images):
                raise UserError(f"{args.captions}: {len(captions)} lines for {len(images)} images")
            conditioning = captions[: len(images)]
        mine = multihost.host_share(len(images))  # several hosts: each evaluates its share
        images = images[mine.start:mine.stop]
        conditioning = None if conditioning is None else list(conditioning)[mine.start:mine.stop]
        out = Path(args.out or Path(args.images).resolve().parent / f"{Path(args.images).resolve().name}_metrics.json")
    results = evaluate_images(evaluators, images, conditioning)
    report = {"metrics": results, "source": args.workdir or args.images, "ref": args.ref,
              "seconds": round(time.time() - t0, 2)}
    if args.workdir:
        report.update(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
    if multihost.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(results))
        print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    distributed.run_job(lambda: real_main(args))
