"""sample.py for an image-to-video model (SVD, SVD-XT; configs/inference/svd*.py): one video from
--init-image, as the seed's scripts/sampling/simple_video_sample.py.

    python sample.py --config inference/svd_xt --checkpoint checkpoints/svd_xt --init-image in.png \\
        --num-frames 25 --fps 6 --motion-bucket-id 127 --out video.mp4

--out: an .mp4 (imageio's ffmpeg plugin: pip install 'imageio[ffmpeg]'), a .gif, or a folder for
one PNG per frame (with the settings in their metadata). Frames carry the seed's watermark
unless --no-watermark.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax

from sgm_jax import multihost
from sgm_jax.errors import UserError
from sgm_jax.inference.loading import enable_compilation_cache, load_image
from sgm_jax.inference.models import load_pipeline
from sgm_jax.inference.outputs import Watermark, save_video, video_path
from sgm_jax.inference.pipeline import engine_for_sampling, size_multiple
from sgm_jax.inference.video import sample_request, video_spec
from sgm_jax.parallel import make_mesh
from sgm_jax.sampling_defaults import SamplingDefaults


def add_flags(p: argparse.ArgumentParser) -> None:
    video = p.add_argument_group("image to video (SVD)")
    video.add_argument("--num-frames", type=int, help="frames of the video (inference.num_frames)")
    video.add_argument("--fps", type=int, help="frame rate: conditions the model on fps - 1 (inference.fps_id) "
                                               "and sets the video's rate")
    video.add_argument("--motion-bucket-id", type=int, help="how much motion (inference.motion_bucket_id)")
    video.add_argument("--cond-aug", type=float, help="noise on the conditioning frame (inference.cond_aug)")
    video.add_argument("--decoding-t", type=int, help="frames decoded per VAE call (inference.decoding_t)")


VIDEO_FIELDS = {"num_frames": "num_frames", "motion_bucket_id": "motion_bucket_id", "cond_aug": "cond_aug",
                "decoding_t": "decoding_t"}


def run_video(config: Any, defaults: SamplingDefaults, args: argparse.Namespace, options: dict[str, float],
              name: str) -> int:
    d = defaults
    for flag in ("prompt", "refiner", "lora"):
        if getattr(args, flag):
            raise UserError(f"--{flag} is not for an image-to-video model ({name}): give --init-image")
    if not args.init_image:  # --num-frames / --decoding-t were checked with the other fields (request_config)
        raise UserError(f"{name} makes a video from an image: give --init-image")
    prefix = f"{name}_s{d.seed}"
    target = video_path(args.out, prefix)  # checked before the weights load or anything compiles
    engine = engine_for_sampling(config, "float32")
    image = load_image(args.init_image, args.width, args.height, size_multiple(engine)[0])
    if not args.no_cache:
        enable_compilation_cache(args.cache_dir)
    pipeline = load_pipeline(config, d.checkpoint, config_label=str(args.config), name=name, dtype=args.dtype,
                             param_dtype=args.param_dtype, mesh=make_mesh(devices=jax.local_devices()))
    spec = video_spec(pipeline, d.num_frames, **options)
    height, width = image.shape[1:3]
    print(f"{name}: {d.num_frames} frames of {width}x{height} from {args.init_image}, {spec.name} {spec.steps} "
          f"steps, {spec.guider} {d.cfg_scale}, fps_id {d.fps_id}, motion {d.motion_bucket_id}, "
          f"cond_aug {d.cond_aug}")
    frames, meta = sample_request(pipeline, image, d, spec)
    print(f"sampled in {meta['seconds']:.1f} s (compile included)")
    meta.update(model=name, checkpoint=str(d.checkpoint), init_image=str(args.init_image))
    if multihost.is_main():
        for path in save_video(frames, target, d.fps_id + 1, meta, prefix, Watermark(enabled=not args.no_watermark)):
            print(f"wrote {path}")
    return 0
