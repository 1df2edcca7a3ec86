"""What the web demo does per request, without any web framework (tests call it directly).

`DemoService` holds the models a demo offers (train.py workdirs and converted SDXL / SD 2.1
directories), loads each at most once (`ModelCache`: weights and compiled functions live across
requests) and turns a `DemoRequest` into PNG files with the settings in their metadata, stamped with
the seed's invisible watermark unless turned off (watermark=False; sgm-demo --no-watermark). It
calls exactly what sample.py calls with the same defaults (config.inference) and saves through the
same outputs.save_images, so the same settings and seed give the same pixels in both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sgm_jax.checkpointing.workdirs import read_workdir_config
from sgm_jax.config_files import config_name, load_config
from sgm_jax.errors import UserError
from sgm_jax.nn.conditioner import class_count
from sgm_jax.sampling_defaults import AS_TRAINED, SamplingDefaults

from .models import ModelCache, load_workdir_config, parse_loras
from .loading import load_image
from .outputs import Watermark, save_images, save_video, to_pil
from .pipeline import check_size, size_multiple
from .requests import ImageRequest, generate
from .runner import StepEvent
from .video import is_video_config, sample_request, video_spec
from .sampling import SAMPLER_DEFAULTS, SamplerSpec


@dataclass(frozen=True)
class ModelSource:
    """A model the demo offers: a train.py workdir, or converted weights with their config."""

    label: str
    kind: str                 # "workdir" or "converted"
    path: str
    config: str | None = None  # converted: config name / file

    @classmethod
    def parse(cls, spec: str) -> "ModelSource":
        """'DIR' (a workdir, or converted weights naming their config) or 'CONFIG=DIR'."""
        config, eq, path = spec.partition("=")
        if not eq:
            config, path = None, spec
        p = Path(path).expanduser()
        if (p / "config.json").is_file() and config is None:
            read_workdir_config(p)  # an autoencoder's workdir: one line saying what it is for
            return cls(f"{p.name} (trained)", "workdir", str(p))
        if config is None:
            meta = p / "metadata.json"
            config = json.loads(meta.read_text()).get("config") if meta.is_file() else None
            if not config:
                raise UserError(f"{p} is neither a train.py workdir nor converted weights naming their config; "
                                "give CONFIG=DIR")
        return cls(f"{p.name} ({config_name(config)})", "converted", str(p), str(config))


def discover(folders: list[str]) -> list[ModelSource]:
    """Workdirs (config.json) and converted weights (metadata.json naming a config) in `folders`."""
    found = []
    for folder in folders:
        for p in sorted(Path(folder).expanduser().glob("*")) if Path(folder).expanduser().is_dir() else []:
            if (p / "config.json").is_file() or (p / "metadata.json").is_file():
                try:
                    found.append(ModelSource.parse(str(p)))
                except UserError:
                    pass
    return found


@dataclass
class DemoRequest:
    model: str
    prompt: str = ""
    negative_prompt: str = ""
    classes: list[Any] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    discretization: str | None = None
    options: dict[str, float] = field(default_factory=dict)
    seed: int = 42
    num: int = 1
    init_image: np.ndarray | None = None   # uint8 [H, W, 3] as uploaded (floored to the size multiple)
    strength: float | None = None
    refiner: str | None = None
    refiner_strength: float | None = None
    refiner_steps: int | None = None   # default: steps
    loras: list[str] = field(default_factory=list)


@dataclass
class VideoRequest:
    """Image to video (SVD): None takes the model's inference defaults; fps as sample.py's --fps."""
    model: str
    init_image: np.ndarray | None = None   # uint8 [H, W, 3] as uploaded
    num_frames: int | None = None
    fps: int | None = None
    motion_bucket_id: int | None = None
    cond_aug: float | None = None
    steps: int | None = None
    seed: int = 23


MAX_IMAGES = 64                   # images per request (sgm-demo --max-images)
MAX_PIXELS = 16 * 1024 * 1024     # width x height x images per request: 16 SDXL images (--max-pixels)


class DemoService:
    """Per-step progress comes from inside the compiled loop (step_progress=True): such loops are
    not written to JAX's persistent cache, but a server compiles each once per process anyway.
    A request beyond max_images, or beyond max_pixels in width x height x images, is refused
    before any work, so one abusive request cannot hold the queue. Saved images carry the seed's
    invisible watermark unless `watermark` is False (too small ones: the server log says so once)."""

    def __init__(self, sources: list[ModelSource], out_dir: str | os.PathLike | None = None,
                 tokenizer: str | None = None, max_images: int = MAX_IMAGES, max_pixels: int = MAX_PIXELS,
                 watermark: bool = True) -> None:
        self.max_images, self.max_pixels = int(max_images), int(max_pixels)
        self.watermark = Watermark(enabled=watermark)
        if not sources:
            raise UserError("no models: pass --model DIR (a train.py workdir or converted weights) or put them "
                            "under ./workdir or ./checkpoints")
        self.sources = {s.label: s for s in sources}
        self.cache = ModelCache()
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="sgm_jax_demo_"))
        self._configs: dict[str, Any] = {}
        # one request at a time, even when Gradio frees a cancelled request's slot while its batch still runs
        self._running = threading.Lock()

    def source(self, label: str) -> ModelSource:
        if label not in self.sources:
            raise UserError(f"unknown model {label!r}; choose one of: {', '.join(self.sources)}")
        return self.sources[label]

    def config(self, label: str) -> Any:
        """The model's config (with its `inference` defaults); read once, no weights."""
        if label not in self._configs:
            s = self.source(label)
            self._configs[label] = load_workdir_config(s.path) if s.kind == "workdir" else load_config(s.config)
        return self._configs[label]

    def info(self, label: str) -> dict[str, Any]:
        """What the UI shows for a model: conditioning, classes, sizes and sampler defaults."""
        s, config = self.source(label), self.config(label)
        d = SamplingDefaults.from_config(config)
        emb = (config.model.params.get("conditioner_config") or {}).get("params", {}).get("emb_models", [])
        keys = [e.get("input_key") for e in emb]
        return {"kind": s.kind, "text": "txt" in keys, "classes": list(range(class_count(emb) or 0)),
                "resolutions": [f"{w}x{h}" for w, h in d.resolutions],
                "width": d.width, "height": d.height, "sampler": d.sampler,
                "steps": d.num_steps, "cfg_scale": d.cfg_scale, "discretization": d.discretization,
                "seed": d.seed, "strength": d.img2img_strength,
                "refiner_strength": d.refiner_strength, "img2img": s.kind == "converted",
                "video": s.kind == "converted" and is_video_config(config), "num_frames": d.num_frames,
                "fps": d.fps_id + 1, "motion_bucket_id": d.motion_bucket_id, "cond_aug": d.cond_aug}

    def _pipeline(self, label: str, loras: list[str] = ()):  # type: ignore[assignment]
        s = self.source(label)
        if s.kind != "converted":
            raise UserError(f"{label} is a trained workdir; refiners and LoRA need converted weights")
        return self.cache.pipeline(s.config, s.path, tokenizer=self.tokenizer, loras=tuple(parse_loras(loras)),
                                   step_progress=True)

    def generate(self, req: DemoRequest,
                 progress: Callable[[StepEvent], None] | None = None) -> tuple[list[Path], dict]:
        """PNG paths (uint8 pixels as sample.py writes them) and the request's metadata."""
        if req.num <= 0 or (req.steps is not None and req.steps <= 0) or req.seed < 0:
            raise UserError("count and steps must be positive, the seed >= 0")
        s = self.source(req.model)
        if s.kind == "converted" and is_video_config(self.config(s.label)):
            raise UserError(f"{req.model} makes videos from an image: use the image-to-video section")
        self._check_caps(s, req)
        with self._running:
            t0 = time.perf_counter()
            if s.kind == "workdir":
                images, captions, meta = self._trained(s, req, progress)
            else:
                images, captions, meta = self._converted(s, req, progress)
        meta.update(seed=req.seed, model=config_name(s.path), seconds=round(time.perf_counter() - t0, 3))
        folder = self.out_dir / f"{int(time.time() * 1000)}"
        paths = save_images(images, [folder / f"{config_name(s.path)}_s{req.seed}_{i:03d}.png"
                                     for i in range(len(images))], meta, captions, watermark=self.watermark)
        return paths, meta

    def _check_caps(self, s: ModelSource, req: DemoRequest) -> None:
        if req.num > self.max_images:
            raise UserError(f"{req.num} images asked: this demo serves at most {self.max_images} per request "
                            "(sgm-demo --max-images)")
        info = self.info(s.label)
        if req.init_image is not None:  # img2img: the upload's size
            height, width = np.shape(req.init_image)[:2]
        elif s.kind == "workdir":  # a trained model samples at its training size
            width, height = info["width"], info["height"]
        else:
            width, height = req.width or info["width"], req.height or info["height"]
        pixels = int(width) * int(height) * req.num
        if pixels > self.max_pixels:
            raise UserError(f"{req.num} images of {width}x{height} are {pixels:,} pixels: this demo serves at most "
                            f"{self.max_pixels:,} (width x height x images) per request (sgm-demo --max-pixels)")

    def _trained(self, s: ModelSource, req: DemoRequest, progress) -> tuple[np.ndarray, list[str], dict]:
        model = self.cache.trained(s.path, step_progress=True)
        spec = model.spec(req.sampler, req.steps, req.discretization, **self._options(req, model.spec().name))
        conds = list(req.classes) if model.condition_key == "cls" else ([req.prompt] if model.conditional else [])
        result = model.sample(conds, num=req.num, seed=req.seed, spec=spec, cfg_scale=req.cfg_scale,
                              negative_prompt=req.negative_prompt, progress=progress)
        scale = model.defaults.cfg_scale if req.cfg_scale is None else req.cfg_scale
        meta = {"sampler": spec.name, "steps": spec.steps, "cfg_scale": scale, "step": model.step,
                "discretization": req.discretization or AS_TRAINED, "conditions": ",".join(map(str, conds)),
                "size": f"{model.image_shape[1]}x{model.image_shape[0]}", "options": dict(spec.options)}
        return result.images, result.captions, meta

    def _upload(self, picture: np.ndarray, pipeline: Any) -> np.ndarray:
        """An uploaded uint8 [H, W, 3] through load_image, as sample.py reads --init-image."""
        upload = self.out_dir / "uploads" / f"{int(time.time() * 1000)}.png"
        upload.parent.mkdir(parents=True, exist_ok=True)
        to_pil(np.asarray(picture, np.uint8)).convert("RGB").save(upload)
        return load_image(upload, None, None, size_multiple(pipeline.engine)[0])

    def video(self, req: VideoRequest) -> tuple[list[Path], dict]:
        """Image to video (SVD): the frames as PNGs (what sample.py --out FOLDER writes for the same
        settings) and a GIF of them, last; the request's metadata."""
        s = self.source(req.model)
        config = self.config(s.label)
        if s.kind != "converted" or not is_video_config(config):
            raise UserError(f"{req.model} is not an image-to-video model")
        if req.init_image is None:
            raise UserError("image to video needs an init image")
        given = {"num_frames": req.num_frames, "fps_id": None if req.fps is None else int(req.fps) - 1,
                 "motion_bucket_id": req.motion_bucket_id, "cond_aug": req.cond_aug}
        d = dataclasses.replace(SamplingDefaults.from_config(config), seed=req.seed,
                                **{k: v for k, v in given.items() if v is not None})
        if not 1 <= d.num_frames <= self.max_images or req.seed < 0 or (req.steps is not None and req.steps <= 0):
            raise UserError(f"frames must be 1 to {self.max_images} (sgm-demo --max-images), steps positive, "
                            "the seed >= 0")
        with self._running:
            pipeline = self._pipeline(s.label)
            image = self._upload(req.init_image, pipeline)
            frames, meta = sample_request(pipeline, image, d, video_spec(pipeline, d.num_frames, req.steps))
        name = config_name(s.path)
        meta["model"] = name
        folder, prefix = self.out_dir / f"{int(time.time() * 1000)}", f"{name}_s{req.seed}"
        paths = save_video(frames, folder, d.fps_id + 1, meta, prefix, self.watermark)
        return paths + save_video(frames, folder / f"{prefix}.gif", d.fps_id + 1, meta, prefix, self.watermark), meta

    def _options(self, req: DemoRequest, default_sampler: str) -> dict[str, float]:
        name = req.sampler or default_sampler
        return {k: v for k, v in req.options.items() if k in SAMPLER_DEFAULTS.get(name, {}) and v is not None}

    def _converted(self, s: ModelSource, req: DemoRequest, progress) -> tuple[np.ndarray, list[str], dict]:
        config = self.config(s.label)
        defaults = SamplingDefaults.from_config(config)
        base = self._pipeline(s.label, req.loras)
        width, height = int(req.width or defaults.width), int(req.height or defaults.height)
        image = None
        if req.init_image is not None:
            image = self._upload(req.init_image, base)
            height, width = image.shape[1:3]
        check_size(base.engine, width, height, config_name(s.config))
        refiner = self._pipeline(req.refiner) if req.refiner else None
        if refiner is not None:
            check_size(refiner.engine, width, height, req.refiner)
        name = req.sampler or defaults.sampler
        request = ImageRequest.create(
            defaults, prompt=req.prompt, negative_prompt=req.negative_prompt, width=width, height=height, num=req.num,
            seed=req.seed, sampler=name, steps=req.steps, refiner_steps=req.refiner_steps,
            discretization=req.discretization, options=self._options(req, SamplerSpec.create(name).name),
            cfg_scale=req.cfg_scale, init_image=image, img2img_strength=req.strength,
            refiner_strength=req.refiner_strength)
        meta = request.metadata(refiner)
        if req.loras:
            meta["loras"] = ", ".join(req.loras)
        images = generate(base, refiner, request, progress=progress)
        return images, [], meta
