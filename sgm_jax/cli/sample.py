"""sgm-sample / python sample.py: sample SDXL / SD 2.1 (converted weights) or a train.py workdir.

    sgm-sample --config inference/sd_xl_base --checkpoint checkpoints/sd_xl_base \
        --prompt "an astronaut riding a horse" --num 4 --steps 40 --seed 42 --out outputs/
    sgm-sample ... --refiner checkpoints/sd_xl_refiner --refiner-strength 0.15     # base -> refiner
    sgm-sample ... --init-image photo.png --strength 0.75                          # img2img
    sgm-sample --workdir workdir/mnist_cond_cpu --classes 0,1,2 --num 4 --out grid.png
    sgm-sample --config inference/svd_xt --checkpoint checkpoints/svd_xt --init-image in.png \
        --num-frames 25 --fps 6 --motion-bucket-id 127 --out video.mp4              # image to video

One surface for both: every default comes from the config's `inference` section (the
configs/inference/* file, or a workdir's config.json and its sampler), each flag below is a
shorthand for one of its fields, and any field can be set with --config.inference.FIELD=V.
--num is the number of images per prompt / class; --out is a folder (one PNG per image) or a
.png (the image, or a grid of them). Every PNG carries the settings in its text metadata and,
as in the seed, its invisible watermark (images of 256x256 px or more; --no-watermark: none); the
same arguments and seed give the same images. Errors are one line (SGM_JAX_TRACEBACK=1: traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from sgm_jax import multihost
from sgm_jax.errors import UserError
from sgm_jax.inference import load_image
from sgm_jax.inference.loading import enable_compilation_cache
from sgm_jax.inference.models import load_pipeline, load_workdir_config, parse_loras
from sgm_jax.inference.outputs import Watermark, output_paths, save_grid, save_images
from sgm_jax.inference.pipeline import check_size, engine_for_sampling, size_multiple
from sgm_jax.inference.requests import ImageRequest, generate
from sgm_jax.inference.video import is_video_config
from sgm_jax.inference.workdir import TrainedModel
from sgm_jax.nn.conditioner import class_count
from sgm_jax.parallel import make_mesh
from sgm_jax.sampling_defaults import SamplingDefaults

from . import distributed, sample_video
from .configs import (
    ArgumentParser,
    apply_overrides,
    config_name,
    load_config,
    split_overrides,
)

SAMPLERS = ("euler_edm", "heun_edm", "euler_ancestral", "dpmpp2s_ancestral", "dpmpp2m", "linear_multistep",
            "substep_euler_ancestral")
# flag -> the inference field it sets
FIELDS = {"num": "num_samples", "seed": "seed", "steps": "num_steps", "sampler": "sampler", "cfg_scale": "cfg_scale",
          "discretization": "discretization", "width": "width", "height": "height", "strength": "img2img_strength",
          "refiner_strength": "refiner_strength", "negative_prompt": "negative_prompt",
          "checkpoint": "checkpoint", "refiner": "refiner_checkpoint", "refiner_config": "refiner_config",
          **sample_video.VIDEO_FIELDS}
BLOCK_BATCHES = 4  # compiled batches sampled (and held in memory) before their PNGs are written
POSITIVE = ("num_samples", "num_steps", "width", "height", "batch_per_device", "num_frames", "decoding_t")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sgm-sample", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    model = p.add_argument_group("model: --config with converted weights, or --workdir")
    model.add_argument("--config", help="inference config: file or shipped name (inference/sd_xl_base)")
    model.add_argument("--checkpoint", help="converted weights directory (convert_torch_weights.py)")
    model.add_argument("--workdir", help="a train.py run (its config.json and checkpoints)")
    model.add_argument("--step", type=int, help="workdir: sample this checkpoint step (default: the newest)")
    model.add_argument("--no-ema", action="store_true", help="workdir: the raw weights, not the EMA ones")
    model.add_argument("--tokenizer", help="CLIP tokenizer: folder, diffusers folder or bpe_simple_vocab_16e6.txt.gz")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="compute dtype (default: inference.dtype on GPU/TPU, float32 on CPU)")
    model.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), help="cast weights on load")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="merge a LoRA file (kohya-ss or diffusers layout) at SCALE (default 1); repeatable")
    model.add_argument("--lora-strict", action=argparse.BooleanOptionalAction, default=True,
                       help="a LoRA key that fits no weight is an error (--no-lora-strict: skipped, counted)")
    req = p.add_argument_group("request")
    req.add_argument("--prompt", action="append", help="text prompt; repeat for several prompts")
    req.add_argument("--classes", help="workdir: comma-separated class ids (default 0..9 for a class model)")
    req.add_argument("--negative-prompt", help="the unconditional branch of CFG (inference.negative_prompt)")
    req.add_argument("--width", type=int, help="pixels (inference.width)")
    req.add_argument("--height", type=int, help="pixels (inference.height)")
    req.add_argument("--num", type=int, help="images per prompt / class (inference.num_samples)")
    req.add_argument("--batch-size", type=int,
                     help="images per compiled call (default inference.batch_per_device x devices)")
    req.add_argument("--seed", type=int, help="inference.seed")
    smp = p.add_argument_group("sampler")
    smp.add_argument("--sampler", choices=SAMPLERS, help="inference.sampler")
    smp.add_argument("--steps", type=int, help="inference.num_steps")
    smp.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (inference.cfg_scale)")
    smp.add_argument("--discretization", choices=("legacy_ddpm", "edm"),
                     help="noise schedule (inference.discretization)")
    smp.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                     help="a sampler's own parameter: s_churn, s_tmin, s_tmax, s_noise, eta, order")
    i2i = p.add_argument_group("img2img")
    i2i.add_argument("--init-image", help="start from this image (resized to --width/--height if given)")
    i2i.add_argument("--strength", type=float,
                     help="share of the schedule run from the image (inference.img2img_strength)")
    ref = p.add_argument_group("refiner (SDXL base -> refiner hand-off)")
    ref.add_argument("--refiner", help="converted refiner weights directory (inference.refiner_checkpoint)")
    ref.add_argument("--refiner-config", help="refiner config (inference.refiner_config)")
    ref.add_argument("--refiner-strength", type=float, help="share of the schedule the refiner runs")
    ref.add_argument("--refiner-steps", type=int, help="default: --steps")
    ref.add_argument("--refiner-cfg-scale", type=float, help="default: --cfg-scale")
    out = p.add_argument_group("output and runtime")
    out.add_argument("--out", default="outputs", help="folder (one PNG per image) or .png (one image or a grid)")
    out.add_argument("--no-watermark", action="store_true", help="PNGs without the seed's invisible watermark")
    out.add_argument("--cache-dir", default="~/.cache/sgm_jax/jax_cache", help="JAX persistent compilation cache")
    out.add_argument("--no-cache", action="store_true", help="disable the persistent compilation cache")
    out.add_argument("--progress-steps", action="store_true",
                     help="per-step progress from inside the compiled loop even with the cache on (recompiles)")
    out.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    sample_video.add_flags(p)
    distributed.add_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status (also for tests); errors are one `error:` line on stderr."""
    try:
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(rest)
        if args.debug:
            os.environ["SGM_JAX_TRACEBACK"] = "1"
        distributed.run_job(lambda: run(args, overrides))
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


def console_main() -> None:
    sys.exit(main())


# ----------------------------------------------------------------------------- request


def parse_options(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            out[name.strip()] = float(value) if name.strip() != "order" else int(value)
        except ValueError:
            raise UserError(f"--sampler-option {item}: expected NAME=NUMBER, e.g. s_churn=0.5") from None
        if not eq:
            raise UserError(f"--sampler-option {item}: expected NAME=NUMBER, e.g. eta=1.0")
    return out


def request_config(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> tuple[Any, SamplingDefaults]:
    """(config, its sampling defaults): the config with --config.* overrides and then the flags
    folded into `inference`, resolved once and checked."""
    if bool(args.workdir) == bool(args.config):
        raise UserError("pass --config (SDXL / SD 2.1 inference config) or --workdir (a train.py run), one of them")
    if args.workdir:
        for flag in ("checkpoint", "refiner", "init_image", "tokenizer"):
            if getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} is for converted models (--config); "
                                f"a --workdir brings its own weights")
        config = load_workdir_config(args.workdir)
    else:
        if args.classes or args.no_ema or args.step is not None:
            raise UserError("--classes / --no-ema / --step are for a train.py --workdir; "
                            "converted models take --prompt")
        config = load_config(args.config)
    apply_overrides(config, overrides)
    inf = config.inference
    for flag, key in FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            inf[key] = value
    if args.fps is not None:  # the seed's video demo conditions on fps - 1
        inf["fps_id"] = args.fps - 1
    defaults = SamplingDefaults.from_config(config)
    for key in POSITIVE:
        value = getattr(defaults, key)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r} (flag --"
                            f"{next((f for f, k in FIELDS.items() if k == key), key).replace('_', '-')})")
    for flag in ("batch_size", "refiner_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if int(defaults.seed) < 0:
        raise UserError(f"--seed must be >= 0, got {defaults.seed}")
    for key in ("img2img_strength", "refiner_strength"):
        if not 0.0 <= float(getattr(defaults, key)) <= 1.0:
            raise UserError(f"{key} must be in [0, 1], got {getattr(defaults, key)}")
    return config, defaults


def workdir_conditions(config: Any, args: argparse.Namespace) -> list[Any]:
    """The classes / prompts of a workdir request, from its conditioner (no weights read)."""
    emb = config.model.params.get("conditioner_config") or {}
    specs = [s for s in (emb.get("params") or {}).get("emb_models", []) if s.get("input_key") in ("cls", "txt")]
    key = specs[0]["input_key"] if specs else None
    if key == "cls":
        if args.prompt:
            raise UserError(f"the model in {args.workdir} is class-conditional: give --classes, not --prompt")
        if args.classes:
            return [c.strip() for c in args.classes.split(",") if c.strip()]
        return list(range(min(class_count(specs), 10)))  # the first ten labels by default
    if key == "txt":
        if args.classes or not args.prompt:
            raise UserError(f"the model in {args.workdir} is text-conditional: give --prompt")
        return list(args.prompt)
    if args.classes or args.prompt:
        raise UserError(f"the model in {args.workdir} is unconditional: drop --classes / --prompt")
    return []


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    config, defaults = request_config(args, overrides)
    distributed.start(args)  # before any other JAX call; each host then samples its share on its devices
    options = parse_options(args.sampler_option)
    if not args.workdir and is_video_config(config):
        return sample_video.run_video(config, defaults, args, options, config_name(args.config))
    loras = parse_loras(args.lora)
    if args.workdir:
        if loras:
            raise UserError("--lora applies to converted SDXL / SD 2.1 models, not to a --workdir")
        name, conds = Path(args.workdir).resolve().name, workdir_conditions(config, args)
    else:
        name, conds = config_name(args.config), list(args.prompt or [""])
    # the output location is checked before the weights load or anything compiles
    num = defaults.num_samples
    paths, grid = output_paths(args.out, max(len(conds), 1) * num, f"{name}_s{defaults.seed}")
    if not args.no_cache:
        enable_compilation_cache(args.cache_dir)
    step_progress = True if args.progress_steps else None
    t0 = time.perf_counter()
    if args.workdir:
        meta, models, blocks = sample_workdir(config, defaults, args, conds, options, step_progress)
    else:
        meta, models, blocks = sample_converted(config, defaults, name, conds, args, options, loras, step_progress)
    written, kept, captions, stamp = [], [], [], Watermark(enabled=not args.no_watermark)
    for first, images, caps in blocks:  # saved block by block: a long request never sits in memory
        if grid is not None:
            kept.append(images)
            captions += caps
        else:
            written += save_images(images, paths[first:first + len(images)], meta, caps, first=first, watermark=stamp)
    if grid is not None:  # every host's share, in image order, to process 0
        images = multihost.gather_rows(np.concatenate(kept) if kept else np.zeros((0,), np.uint8))
        captions = [c for host in multihost.gather_json(captions) for c in host]
        written = [save_grid(images, grid, num, meta, captions, stamp)] if multihost.is_main() else []
    report_timings(models, time.perf_counter() - t0, max(len(conds), 1) * num)
    for path in written:
        print(f"wrote {path}")
    return 0


def whole_devices(batch: int, devices: int) -> int:
    """The batch each compiled call runs: rounded up to the devices (the runner pads so)."""
    return -(-batch // devices) * devices


def blocks_of(groups: int, per_group: int, batch: int) -> list[tuple[int, int, int]]:
    """(group, first, count) blocks of this host's share of a request: `groups` prompts / one
    workdir request of `per_group` images each, in whole compiled batches, a few at a time.

    On several hosts each takes a contiguous share of the compiled batches (host order = image
    order), samples it on its own devices and writes its images; image i's noise depends on
    (seed, i) alone, so the pixels do not depend on the number of hosts."""
    batches = [(g, first, min(batch, per_group - first)) for g in range(groups) for first in range(0, per_group, batch)]
    blocks: list[tuple[int, int, int]] = []
    for g, first, count in (batches[i] for i in multihost.host_share(len(batches))):
        if blocks and blocks[-1][0] == g and blocks[-1][2] < batch * BLOCK_BATCHES:
            blocks[-1] = (g, blocks[-1][1], blocks[-1][2] + count)
        else:
            blocks.append((g, first, count))
    return blocks


def sample_workdir(config: Any, defaults: SamplingDefaults, args: argparse.Namespace, conds: list[Any],
                   options: dict[str, float], step_progress: bool | None) -> tuple[dict[str, Any], list[Any], Iterator]:
    d = defaults
    model = TrainedModel.load(args.workdir, use_ema=not args.no_ema, step=args.step, config=config,
                              step_progress=step_progress)
    model.check_conditions(conds)
    spec = model.spec(**options)
    num = d.num_samples
    total = max(len(conds), 1) * num
    batch = whole_devices(args.batch_size or model.batch_size(total), model.mesh.size)
    print(f"{model.name} (step {model.step}): {len(conds) or 1} condition(s) x {num}, {spec.name} "
          f"{spec.steps} steps, cfg {d.cfg_scale}, {model.mesh.size} device(s)")
    meta = {"model": model.name, "workdir": str(args.workdir), "step": model.step, "ema": not args.no_ema,
            "seed": d.seed, "sampler": spec.name, "steps": spec.steps, "cfg_scale": d.cfg_scale,
            "size": f"{model.image_shape[1]}x{model.image_shape[0]}", "options": dict(spec.options)}
    if conds:
        meta["conditions"] = ",".join(map(str, conds))

    def blocks() -> Iterator:
        bars = ProgressBars()
        for _, first, count in blocks_of(1, total, batch):
            result = model.sample(conds, num=num, seed=d.seed, spec=spec, batch_size=batch,
                                  negative_prompt=d.negative_prompt, progress=bars,
                                  start=first, count=count)
            yield first, result.images, result.captions
        bars.close()

    return meta, [model], blocks()


def sample_converted(config: Any, defaults: SamplingDefaults, name: str, prompts: list[str],
                     args: argparse.Namespace, options: dict[str, float], loras: list[tuple[str, float]],
                     step_progress: bool | None) -> tuple[dict[str, Any], list[Any], Iterator]:
    d = defaults
    engine = engine_for_sampling(config, "float32")
    image = None
    if args.init_image:
        image = load_image(args.init_image, args.width, args.height, size_multiple(engine)[0])  # SetupError: one line
        height, width = image.shape[1:3]
    else:
        width, height = d.width, d.height
    check_size(engine, width, height, name)
    refiner_config = None
    if d.refiner_checkpoint:
        if not d.refiner_config:
            raise UserError(f"{name} names no refiner config: pass --refiner-config")
        refiner_config = load_config(d.refiner_config)
        check_size(engine_for_sampling(refiner_config, "float32"), width, height, config_name(d.refiner_config))
    mesh = make_mesh(devices=jax.local_devices())
    kw = dict(tokenizer=args.tokenizer, dtype=args.dtype, param_dtype=args.param_dtype, mesh=mesh,
              step_progress=step_progress)
    base = load_pipeline(config, d.checkpoint, config_label=str(args.config), name=name, loras=loras,
                         lora_strict=args.lora_strict, **kw)
    refiner = None
    if refiner_config is not None:
        refiner = load_pipeline(refiner_config, d.refiner_checkpoint, config_label=str(d.refiner_config),
                                **kw)
    requests = [ImageRequest.create(d, prompt=p, width=width, height=height, refiner_steps=args.refiner_steps,
                                    options=options, refiner_cfg_scale=args.refiner_cfg_scale, init_image=image)
                for p in prompts]  # each prompt: its own request
    first_request, num = requests[0], requests[0].num
    spec = first_request.spec
    batch = whole_devices(args.batch_size or base.batch_size(num), mesh.size)
    print(f"{name}: {width}x{height}, {len(prompts)} prompt(s) x {num}, {spec.name} {spec.steps} steps, "
          f"cfg {first_request.cfg_scale}, {mesh.size} {jax.default_backend()} device(s)")
    meta = {**first_request.metadata(refiner), "prompt": prompts[0] if len(prompts) == 1 else " | ".join(prompts),
            "model": name, "checkpoint": str(d.checkpoint), "dtype": base.dtype}
    if loras:
        meta["loras"] = ", ".join(f"{Path(p).name}:{s:g}" for p, s in loras)
    if image is not None:
        meta["init_image"] = str(args.init_image)
    if refiner is not None:
        meta["refiner_checkpoint"] = str(d.refiner_checkpoint)

    def blocks() -> Iterator:
        bars = ProgressBars()
        for p, first, count in blocks_of(len(prompts), num, batch):
            images = generate(base, refiner, requests[p], num=count, batch_size=batch, progress=bars,
                              first_index=first)
            yield p * num + first, images, [prompts[p]] * count if len(prompts) > 1 else []
        bars.close()

    return meta, [base] + ([refiner] if refiner else []), blocks()


class ProgressBars:
    """One tqdm bar per stage over all its sampler steps (every chunk)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, ev: Any) -> None:
        from tqdm import tqdm

        if ev.stage != self.stage or self.bar is None:
            self.close()
            self.stage = ev.stage
            self.bar = tqdm(total=ev.steps * ev.chunks, desc=f"{ev.stage} steps", unit="step", leave=True)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


def report_timings(models: Sequence[Any], total: float, num: int) -> None:
    compile_s = sum(t.compile_s for m in models for t in m.timings)
    sample_s = sum(t.run_s for m in models for t in m.timings if t.stage.endswith("sample"))
    print(f"compile {compile_s:.2f} s, sampling {sample_s:.2f} s ({sample_s / max(num, 1):.2f} s/image), "
          f"total {total:.2f} s")


if __name__ == "__main__":
    console_main()
