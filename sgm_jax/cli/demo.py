"""sgm-demo / python demo.py: the seed's sampling demo as a web app (Gradio), over sgm_jax.inference.

    sgm-demo --model workdir/mnist_cond_cpu --model checkpoints/sd_xl_base [--port 7860]

Models: train.py workdirs (a class picker or a prompt, as the model is conditioned) and
converted SDXL / SD 2.1 directories (their config is read from the directory's metadata, or
give CONFIG=DIR); converted SVD models get an image-to-video section (a GIF and its PNG
frames). Without --model, ./workdir/* and ./checkpoints/* are offered. Weights load once per model
and compiled functions are reused: a new prompt, class, seed or CFG scale neither reloads nor
recompiles. Gradio rather than streamlit (the seed's): events are explicit
callbacks with fixed element ids instead of whole-script reruns, so a browser test can drive it
reliably, and per-step progress needs no session-state plumbing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from sgm_jax.errors import USER_EXCEPTIONS, UserError, one_line, run_cli
from sgm_jax.inference.loading import enable_compilation_cache
from sgm_jax.inference.runner import RequestCancelled
from sgm_jax.inference.sampling import SAMPLER_NAMES, canonical_sampler_name
from sgm_jax.inference.service import DemoRequest, DemoService, ModelSource, VideoRequest, discover

from .configs import ArgumentParser

LOG = logging.getLogger("sgm_jax.demo")
SAMPLER_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise", "eta", "order")
CUSTOM = "custom"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sgm-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="DIR|CONFIG=DIR",
                   help="a train.py workdir or converted weights (repeatable; default: ./workdir/*, ./checkpoints/*)")
    p.add_argument("--tokenizer", help="CLIP tokenizer (folder, diffusers folder or bpe_simple_vocab_16e6.txt.gz)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", help="where generated PNGs are kept (default: a temporary folder)")
    p.add_argument("--cache-dir", default="~/.cache/sgm_jax/jax_cache", help="JAX persistent compilation cache")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-watermark", action="store_true",
                   help="save images without the seed's invisible watermark (on by default, as in the seed)")
    p.add_argument("--max-images", type=int, default=64, help="images per request at most (default 64)")
    p.add_argument("--max-pixels", type=int, default=16 * 1024 * 1024,
                   help="width x height x images per request at most (default 16 x 1024 x 1024)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_cli(lambda: serve(args))


def make_service(specs: Sequence[str], tokenizer: str | None = None, out: str | None = None,
                 watermark: bool = True, **caps: int) -> Any:
    """caps: max_images, max_pixels (DemoService's); watermark: stamp the saved images."""

    sources = [ModelSource.parse(s) for s in specs] if specs else discover(["workdir", "checkpoints"])
    return DemoService(sources, out, tokenizer, watermark=watermark, **caps)


def serve(args: argparse.Namespace) -> int:
    if args.max_images <= 0 or args.max_pixels <= 0:
        raise UserError("--max-images and --max-pixels must be positive")
    service = make_service(args.model, args.tokenizer, args.out, watermark=not args.no_watermark,
                           max_images=args.max_images, max_pixels=args.max_pixels)  # checked before anything starts
    if not args.no_cache:
        enable_compilation_cache(args.cache_dir)
    handler = logging.StreamHandler(sys.stdout)  # the server log: one line per cancelled request
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    app = build_app(service)
    print(f"sgm_jax demo on http://{args.host}:{args.port} ({len(service.sources)} model(s))", flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True,
                       allowed_paths=[str(service.out_dir)])
    return 0


# ----------------------------------------------------------------------------- the page


def _number(x: Any, cast=float) -> Any:
    return None if x is None or x == "" else cast(x)


def build_app(service: Any) -> Any:
    """The Gradio Blocks app over a DemoService (elements carry fixed elem_ids for tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr


    labels = list(service.sources)
    converted = [label for label in labels if service.sources[label].kind == "converted"]
    infos = [service.info(label) for label in labels]
    first = infos[0]
    # the choices the server accepts are fixed here: every model's, so the API works without a page load
    # (each page load and model change then narrows them to that model's)
    all_classes = [str(c) for c in sorted({c for info in infos for c in info["classes"]})]
    all_resolutions = [CUSTOM] + sorted({r for info in infos for r in info["resolutions"]})

    def model_fields(info: dict[str, Any]) -> list[Any]:
        resolution = f"{info['width']}x{info['height']}"
        choices = [CUSTOM] + info["resolutions"]
        discretizations = (["config"] if info["kind"] == "workdir" else []) + ["legacy_ddpm", "edm"]
        disc = _discretization(info)
        sized = info["kind"] != "workdir"  # a trained model samples at its training size
        return [gr.update(visible=info["text"]), gr.update(visible=info["text"]),
                gr.update(choices=[str(c) for c in info["classes"]], value=[str(c) for c in info["classes"][:1]],
                          visible=bool(info["classes"])),
                gr.update(choices=choices, value=resolution if resolution in choices else CUSTOM, visible=sized),
                gr.update(value=info["width"], visible=sized), gr.update(value=info["height"], visible=sized),
                canonical_sampler_name(info["sampler"]), info["steps"],
                info["cfg_scale"], gr.update(choices=discretizations, value=disc), info["seed"], info["strength"],
                info["refiner_strength"], gr.update(visible=info["img2img"])]

    with gr.Blocks(title="sgm_jax demo") as app:
        gr.Markdown("## sgm_jax sampling demo")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(labels, value=labels[0], label="Model", elem_id="model")
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative_prompt")
                classes = gr.CheckboxGroup(all_classes, value=[str(c) for c in first["classes"][:1]],
                                           label="Classes", elem_id="classes")
                resolution = gr.Dropdown(all_resolutions, value=CUSTOM, label="Resolution (width x height)",
                                         elem_id="resolution")
                with gr.Row():
                    width = gr.Number(label="Width", precision=0, elem_id="width")
                    height = gr.Number(label="Height", precision=0, elem_id="height")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLER_NAMES), label="Sampler", elem_id="sampler")
                    steps = gr.Number(label="Steps", precision=0, elem_id="steps")
                    cfg = gr.Number(label="CFG scale", elem_id="cfg_scale")
                    discretization = gr.Dropdown(["config", "legacy_ddpm", "edm"], value=_discretization(first),
                                                 label="Discretization", elem_id="discretization")
                with gr.Accordion("Sampler parameters (those of the chosen sampler apply)", open=False):
                    with gr.Row():
                        options = [gr.Number(value=None, label=f"{k} (empty: default)", elem_id=k)
                                   for k in SAMPLER_OPTIONS]
                with gr.Row():
                    seed = gr.Number(label="Seed", precision=0, elem_id="seed")
                    num = gr.Number(value=1, label="Images", precision=0, elem_id="num")
                with gr.Accordion("img2img and refiner", open=False) as extras:
                    init = gr.Image(label="Init image (img2img)", type="numpy", elem_id="init_image")
                    strength = gr.Slider(0.0, 1.0, label="img2img strength", elem_id="strength")
                    refiner = gr.Dropdown(["none"] + converted, value="none", label="Refiner", elem_id="refiner")
                    refiner_strength = gr.Slider(0.0, 1.0, label="Refiner strength (share of the schedule)",
                                                 elem_id="refiner_strength")
                    lora = gr.Textbox(label="LoRA files: FILE[:SCALE], comma-separated", elem_id="lora")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", format="png", columns=4, elem_id="gallery")
                status = gr.Markdown(elem_id="status")
                files = gr.File(label="Download (PNG with metadata)", file_count="multiple", elem_id="download")
                metadata = gr.JSON(label="Metadata", elem_id="metadata")

        fields = [prompt, negative, classes, resolution, width, height, sampler, steps, cfg, discretization, seed,
                  strength, refiner_strength, extras]
        app.load(lambda: model_fields(first), None, fields)
        model.change(lambda label: model_fields(service.info(label)), [model], fields)

        def pick_resolution(choice: str, w: Any, h: Any) -> tuple[Any, Any]:
            if not choice or choice == CUSTOM:
                return w, h
            cw, ch = choice.split("x")
            return int(cw), int(ch)

        resolution.change(pick_resolution, [resolution, width, height], [width, height])

        def run(label, prompt_, negative_, classes_, w, h, sampler_, steps_, cfg_, disc_, seed_, num_, init_,
                strength_, refiner_, refiner_strength_, lora_, *option_values, progress=gr.Progress()):
            done: dict[str, int] = {}
            abandoned = _abandoned_check()

            def report(ev) -> None:
                if abandoned():
                    raise RequestCancelled(f"{label}: request abandoned by its client, stopped after "
                                           f"{ev.chunk + 1} of {ev.chunks} batches ({ev.stage})")
                done[ev.stage] = done.get(ev.stage, 0) + 1
                progress((done[ev.stage], ev.steps * ev.chunks), desc=f"{ev.stage}: step")

            try:
                req = DemoRequest(
                    model=label, prompt=prompt_ or "", negative_prompt=negative_ or "",
                    classes=sorted(int(c) for c in classes_ or []), width=_number(w, int), height=_number(h, int),
                    sampler=sampler_, steps=_number(steps_, int), cfg_scale=_number(cfg_),
                    discretization=disc_, options={k: _number(v) for k, v in zip(SAMPLER_OPTIONS, option_values)},
                    seed=_number(seed_, int) or 0, num=_number(num_, int) or 0, init_image=init_,
                    strength=_number(strength_), refiner=None if refiner_ in (None, "none") else refiner_,
                    refiner_strength=_number(refiner_strength_),
                    loras=[x.strip() for x in (lora_ or "").split(",") if x.strip()])
                paths, meta = service.generate(req, progress=report)
            except USER_EXCEPTIONS as e:
                return [], None, None, f"error: {one_line(e)}"
            except RequestCancelled as e:  # nobody reads the answer; the server log says why the run ended
                LOG.info("cancelled: %s", e)
                return [], None, None, "cancelled"
            shown = [(str(p), meta.get("prompt") or _caption(p)) for p in paths]
            return (shown, [str(p) for p in paths], meta,
                    f"{len(paths)} image(s) in {meta['seconds']:.2f} s (seed {meta['seed']})")

        generate.click(run, [model, prompt, negative, classes, width, height, sampler, steps, cfg, discretization,
                             seed, num, init, strength, refiner, refiner_strength, lora, *options],
                       [gallery, files, metadata, status], api_name="generate")
        video_labels = [label for label, info in zip(labels, infos) if info["video"]]
        if video_labels:
            video_section(gr, service, video_labels, infos[labels.index(video_labels[0])])
    return app


def video_section(gr: Any, service: Any, labels: list[str], first: dict[str, Any]) -> None:
    """Image to video (SVD) for the video models: one GIF and its PNG frames per request."""
    with gr.Accordion("Image to video (SVD)", open=True):
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(labels, value=labels[0], label="Video model", elem_id="video_model")
                init = gr.Image(label="Conditioning frame", type="numpy", elem_id="video_init_image")
                with gr.Row():
                    frames = gr.Number(first["num_frames"], label="Frames", precision=0, elem_id="video_frames")
                    fps = gr.Number(first["fps"], label="fps", precision=0, elem_id="video_fps")
                    motion = gr.Number(first["motion_bucket_id"], label="Motion bucket id", precision=0,
                                       elem_id="video_motion_bucket_id")
                    cond_aug = gr.Number(first["cond_aug"], label="cond_aug", elem_id="video_cond_aug")
                with gr.Row():
                    steps = gr.Number(first["steps"], label="Steps", precision=0, elem_id="video_steps")
                    seed = gr.Number(23, label="Seed", precision=0, elem_id="video_seed")
                go = gr.Button("Make video", variant="primary", elem_id="video_generate")
            with gr.Column(scale=1):
                shown = gr.Image(label="Video (GIF)", type="filepath", elem_id="video")
                gallery = gr.Gallery(label="Frames (PNG with metadata)", format="png", columns=5,
                                     elem_id="video_frames_gallery")
                status = gr.Markdown(elem_id="video_status")
                metadata = gr.JSON(label="Metadata", elem_id="video_metadata")

    def run(label, init_, frames_, fps_, motion_, cond_aug_, steps_, seed_):
        try:
            paths, meta = service.video(VideoRequest(
                model=label, init_image=init_, num_frames=_number(frames_, int), fps=_number(fps_, int),
                motion_bucket_id=_number(motion_, int), cond_aug=_number(cond_aug_), steps=_number(steps_, int),
                seed=_number(seed_, int) or 0))
        except USER_EXCEPTIONS as e:
            return None, [], None, f"error: {one_line(e)}"
        return (str(paths[-1]), [str(p) for p in paths[:-1]], meta,
                f"{meta['num_frames']} frames in {meta['seconds']:.2f} s (seed {meta['seed']})")

    go.click(run, [model, init, frames, fps, motion, cond_aug, steps, seed], [shown, gallery, metadata, status],
             api_name="video")


def _abandoned_check() -> Callable[[], bool]:
    """Inside an event handler: () -> whether Gradio has given up on this request, its client gone
    (the page closed: the queue marks the job not alive) or cancelled (gradio_client's Job.cancel:
    the job leaves the active ones while this thread still runs). Gradio offers no public hook for
    this; without its queue (or on another Gradio layout) a request is never taken as abandoned."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    jobs = getattr(getattr(blocks, "_queue", None), "active_jobs", None)
    if event_id is None or jobs is None:
        return lambda: False

    def abandoned() -> bool:
        for job in list(jobs):
            for event in job or ():
                if getattr(event, "_id", None) == event_id:
                    return not getattr(event, "alive", True)
        return True

    return abandoned


def _discretization(info: dict[str, Any]) -> str:
    """The discretization choice that names a model's own schedule."""
    disc = info["discretization"]
    if info["kind"] == "workdir" and disc == "config":
        return disc
    return disc if disc in ("legacy_ddpm", "edm") else ("edm" if "edm" in str(disc).lower() else "legacy_ddpm")


def _caption(path: Any) -> str:
    """The condition a workdir model's image was drawn for: "class 3", or the prompt."""
    from PIL import Image

    with Image.open(path) as im:
        condition = im.text.get("condition", "")
    return f"class {condition}" if condition.isdigit() else condition


if __name__ == "__main__":
    main(sys.argv[1:])
