"""Sample images: SDXL / SD 2.1 from converted weights, or a model trained with train.py.

    python sample.py --config configs/inference/sd_xl_base.py --checkpoint checkpoints/sd_xl_base \
        --prompt "an astronaut riding a horse" --num 4 --steps 40 --seed 42 --out outputs/
    python sample.py ... --refiner checkpoints/sd_xl_refiner --refiner-strength 0.15     # base -> refiner
    python sample.py ... --init-image photo.png --strength 0.75                          # img2img
    python sample.py --workdir workdir/mnist_cond --classes 0,1,2 --num 4 --out grid.png  # trained model

Every PNG carries prompt, negative prompt, seed, sampler, steps, scale, size and model in its
text metadata; the same arguments and seed give the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent
DEFAULT_REFINER_CONFIG = REPO / "configs" / "inference" / "sd_xl_refiner.py"
SAMPLERS = ("euler_edm", "heun_edm", "euler_ancestral", "dpmpp2s_ancestral", "dpmpp2m", "linear_multistep")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    model = p.add_argument_group("model (SDXL / SD 2.1)")
    model.add_argument("--config", help="configs/inference/<model>.py")
    model.add_argument("--checkpoint", help="directory written by convert_torch_weights.py")
    model.add_argument("--tokenizer",
                       help="CLIP tokenizer: folder, diffusers checkpoint folder or bpe_simple_vocab_16e6.txt.gz")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU); the VAE stays float32")
    model.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"),
                       help="cast the weights when loading (default: as converted)")
    req = p.add_argument_group("request")
    req.add_argument("--prompt", default="", help="text prompt")
    req.add_argument("--negative-prompt", default="", help="negative prompt (the unconditional branch of CFG)")
    req.add_argument("--width", type=int, help="pixels (default: the config's)")
    req.add_argument("--height", type=int, help="pixels (default: the config's)")
    req.add_argument("--num", type=int, help="images (default 1; MNIST mode: per class, default 8)")
    req.add_argument("--batch-size", type=int, help="images per compiled call (default: all of --num)")
    req.add_argument("--seed", type=int, default=42)
    smp = p.add_argument_group("sampler")
    smp.add_argument("--sampler", choices=SAMPLERS, help="default: the config's (euler_edm)")
    smp.add_argument("--steps", type=int, help="default: the config's (50)")
    smp.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: the config's, 5.0)")
    smp.add_argument("--discretization", choices=("legacy_ddpm", "edm"),
                     help="noise schedule (default: the config's, LegacyDDPMDiscretization)")
    i2i = p.add_argument_group("img2img")
    i2i.add_argument("--init-image", help="start from this image (resized to --width/--height if given)")
    i2i.add_argument("--strength", type=float, default=0.75,
                     help="share of the schedule run from the noised image (0 = return it, 1 = almost ignore it)")
    ref = p.add_argument_group("refiner (SDXL base -> refiner hand-off)")
    ref.add_argument("--refiner", help="converted refiner weights directory")
    ref.add_argument("--refiner-config", default=str(DEFAULT_REFINER_CONFIG))
    ref.add_argument("--refiner-strength", type=float, default=0.15, help="share of the schedule the refiner runs")
    ref.add_argument("--refiner-steps", type=int, help="default: --steps")
    ref.add_argument("--refiner-cfg-scale", type=float, help="default: --cfg-scale")
    mn = p.add_argument_group("trained model (train.py workdir)")
    mn.add_argument("--workdir", help="sample a train.py run instead (class-conditional toy models)")
    mn.add_argument("--classes", help="comma-separated class labels (default: 0..9)")
    mn.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    out = p.add_argument_group("output and runtime")
    out.add_argument("--out", help="SD: output folder, or a .png path (default outputs/); workdir mode: grid .png")
    out.add_argument("--cache-dir", default="~/.cache/sgm_jax/jax_cache", help="JAX persistent compilation cache")
    out.add_argument("--no-cache", action="store_true", help="disable the persistent compilation cache")
    out.add_argument("--progress-steps", action="store_true",
                     help="per-step progress from inside the compiled loop even with the cache on (JAX does not "
                          "cache executables with host callbacks, so the loop then recompiles every run)")
    out.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


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


def output_paths(out: str | None, num: int, prefix: str) -> list[Path]:
    """`--out` folder -> folder/<prefix>_<i>.png; `--out x.png` -> x.png (or x_<i>.png for several)."""
    target = Path(out or "outputs").expanduser()
    if target.suffix.lower() == ".png":
        return [target] if num == 1 else [target.with_name(f"{target.stem}_{i:03d}.png") for i in range(num)]
    return [target / f"{prefix}_{i:03d}.png" for i in range(num)]


def save_images(images: Any, paths: Sequence[Path], metadata: dict[str, Any]) -> list[Path]:
    """uint8 [N, H, W, 3] -> PNGs with text metadata (plus each image's index)."""
    from PIL import Image

    from sgm_jax.training.images import save_png

    return [save_png(Image.fromarray(img), path, {**metadata, "index": i})
            for i, (img, path) in enumerate(zip(images, paths))]


def run_sd(args: argparse.Namespace) -> int:
    import jax

    from sgm_jax.inference import (Pipeline, SamplerSpec, engine_for_sampling, load_checkpoint, load_clip_tokenizer,
                                   load_config, load_image, txt2img_with_refiner)
    from sgm_jax.inference.loading import check_checkpoint
    from sgm_jax.inference.pipeline import check_size, size_multiple
    from sgm_jax.parallel import make_mesh

    if not args.config:
        raise ValueError("--config is required (configs/inference/<model>.py), or --workdir for a train.py run")
    config = load_config(args.config)
    inf = dict(config.get("inference") or {})
    name = Path(args.config).stem
    engine = engine_for_sampling(config, "float32")
    image = None
    if args.init_image:
        multiple = size_multiple(engine)[0]
        image = load_image(args.init_image, args.width, args.height, multiple)
        height, width = image.shape[1:3]
    else:
        width, height = int(args.width or inf.get("width", 1024)), int(args.height or inf.get("height", 1024))
    check_size(engine, width, height, name)
    # fail before any slow loading: every weight directory and the tokenizer must be there
    checkpoint = args.checkpoint or inf.get("checkpoint")
    check_checkpoint(checkpoint, args.config)
    refiner_config = load_config(args.refiner_config) if args.refiner else None
    if args.refiner:
        check_size(engine_for_sampling(refiner_config, "float32"), width, height, Path(args.refiner_config).stem)
        check_checkpoint(args.refiner, args.refiner_config)
    tokenizer = load_clip_tokenizer(config, args.tokenizer)
    params = load_checkpoint(checkpoint, args.config, args.param_dtype)

    num = int(args.num or inf.get("num_samples", 1))
    steps = int(args.steps or inf.get("num_steps", 50))
    sampler = args.sampler or inf.get("sampler", "euler_edm")
    cfg_scale = float(args.cfg_scale if args.cfg_scale is not None else inf.get("cfg_scale", 5.0))
    discretization = args.discretization or inf.get("discretization", "legacy_ddpm")
    spec = SamplerSpec.create(sampler, steps, discretization)
    mesh = make_mesh(devices=jax.local_devices())
    print(f"{name}: {width}x{height}, {num} image(s), {spec.name} {steps} steps, cfg {cfg_scale}, "
          f"{mesh.size} {jax.default_backend()} device(s)")
    step_progress = True if args.progress_steps else None  # None: per-step only when the cache is off
    base = Pipeline(config, params, clip_tokenizer=tokenizer, dtype=args.dtype, mesh=mesh, name=name,
                    step_progress=step_progress)
    bars = ProgressBars()
    run_kw = {"batch_size": args.batch_size, "progress": bars}
    pipelines = [base]
    meta: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
                            "sampler": spec.name, "steps": steps, "cfg_scale": cfg_scale, "width": width,
                            "height": height, "size": f"{width}x{height}", "model": name, "checkpoint": str(checkpoint),
                            "discretization": discretization, "dtype": base.dtype}
    if args.init_image:
        meta.update(init_image=str(args.init_image), strength=args.strength)
    t0 = time.perf_counter()
    if args.refiner:
        refiner_params = load_checkpoint(args.refiner, args.refiner_config, args.param_dtype)
        refiner_tokenizer = tokenizer or load_clip_tokenizer(refiner_config, args.tokenizer)  # same CLIP BPE
        refiner = Pipeline(refiner_config, refiner_params, clip_tokenizer=refiner_tokenizer, dtype=args.dtype,
                           mesh=mesh, name=Path(args.refiner_config).stem, step_progress=step_progress)
        pipelines.append(refiner)
        refiner_spec = SamplerSpec.create(sampler, int(args.refiner_steps or steps), discretization)
        result = txt2img_with_refiner(
            base, refiner, args.prompt, args.negative_prompt, strength=args.refiner_strength, width=width,
            height=height, num=num, seed=args.seed, base_spec=spec, refiner_spec=refiner_spec, cfg_scale=cfg_scale,
            refiner_cfg_scale=args.refiner_cfg_scale, init_image=image, img2img_strength=args.strength, **run_kw)
        meta.update(refiner=refiner.name, refiner_checkpoint=str(args.refiner), refiner_strength=args.refiner_strength,
                    refiner_steps=refiner_spec.steps)
    elif image is not None:
        result = base.img2img(image, args.prompt, args.negative_prompt, strength=args.strength, num=num,
                              seed=args.seed, spec=spec, cfg_scale=cfg_scale, **run_kw)
    else:
        result = base.txt2img(args.prompt, args.negative_prompt, width=width, height=height, num=num,
                              seed=args.seed, spec=spec, cfg_scale=cfg_scale, **run_kw)
    bars.close()
    total = time.perf_counter() - t0
    paths = save_images(result.images, output_paths(args.out, num, f"{name}_s{args.seed}"), meta)
    report_timings(pipelines, total, num)
    for path in paths:
        print(f"wrote {path}")
    return 0


def report_timings(pipelines: Sequence[Any], total: float, num: int) -> None:
    compile_s = sum(t.compile_s for p in pipelines for t in p.timings)
    text_s = sum(t.run_s for p in pipelines for t in p.timings if t.stage.endswith("text"))
    sample_s = sum(t.run_s for p in pipelines for t in p.timings if t.stage.endswith("sample"))
    print(f"compile {compile_s:.2f} s (sampling loop + VAE), text encoding {text_s:.2f} s (first call compiles), "
          f"sampling {sample_s:.2f} s ({sample_s / max(num, 1):.2f} s/image), total {total:.2f} s")


def run_trained(args: argparse.Namespace) -> int:
    """A train.py workdir: sample per class and write one labelled grid (one row per class)."""
    from sgm_jax.training.images import make_grid, save_png
    from sgm_jax.training.restore import sample_trained

    num = int(args.num or 8)
    classes = [int(c) for c in args.classes.split(",") if c.strip()] if args.classes else default_classes(args.workdir)
    images, labels = sample_trained(args.workdir, classes, num, args.sampler, args.steps, args.cfg_scale, args.seed,
                                    use_ema=not args.no_ema)
    out = Path(args.out or Path(args.workdir) / "samples.png").expanduser()
    if out.suffix.lower() != ".png":
        out = out / "samples.png"
    grid = make_grid(images, nrow=num if classes else min(num, 8), labels=[str(int(x)) for x in labels] if classes
                     else None, scale=2)
    meta = {"workdir": str(args.workdir), "classes": ",".join(map(str, classes)), "num_per_class": num,
            "seed": args.seed, "sampler": args.sampler or "config", "steps": args.steps or "config",
            "cfg_scale": args.cfg_scale if args.cfg_scale is not None else "config", "ema": not args.no_ema,
            "size": f"{images.shape[2]}x{images.shape[1]}", "model": Path(args.workdir).name}
    save_png(grid, out, meta)
    print(f"wrote {out} ({len(labels)} samples)")
    return 0


def default_classes(workdir: str) -> list[int]:
    """0..min(n_classes, 10) - 1 for a class-conditional run, [] for an unconditional one."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return []  # sample_trained says what is missing
    emb = json.loads(path.read_text())["model"]["params"].get("conditioner_config") or {}
    for spec in emb.get("params", {}).get("emb_models", []):
        if spec.get("input_key") == "cls":
            return list(range(min(int(spec.get("params", {}).get("n_classes", 10)), 10)))
    return []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workdir and args.config:
        print("error: pass either --config (SDXL / SD 2.1) or --workdir (a train.py run), not both", file=sys.stderr)
        return 2
    from sgm_jax.inference.loading import SetupError, enable_compilation_cache

    if not args.no_cache:  # before anything compiles
        enable_compilation_cache(args.cache_dir)
    try:
        return run_trained(args) if args.workdir else run_sd(args)
    except (SetupError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
