"""Writes tests/data/svd_seed/ and tests/data/svd_manifest.json from the seed's own PyTorch modules
(Stability-AI/generative-models, package `sgm`), float32 on CPU. Run by hand, never by the tests;
the seed's code is read from a checkout outside this repository and nothing of it is copied here:

    git clone https://github.com/Stability-AI/generative-models /tmp/seed
    pip install --target /tmp/seedpeer --no-deps open_clip_torch pytorch-lightning lightning-utilities \
        torchmetrics einops omegaconf antlr4-python3-runtime==4.9.3 ftfy wcwidth timm torchvision==0.28.0
    PYTHONPATH=/tmp/seed:/tmp/seedpeer python tests/make_svd_fixtures.py [--skip-manifest]

Fixtures (each `<name>.json` + `<name>.npz`; arrays NCHW as the seed computes them):
- `trajectory`: configs/inference/tiny_svd.py built by the seed (its DiffusionEngine, conditioner,
  VideoUNet, VideoDecoder first stage, EulerEDMSampler + LinearPredictionGuider), random weights
  (tests/svd_seed.py's recipe), simple_video_sample.py's steps for one image: the conditioner's c / uc,
  one UNet call, the sampled latents and the decoded frames.
- `blocks_1280`: SVD's full-width VideoResBlock and SpatialVideoTransformer (input_blocks.8 of
  svd_xt.yaml's VideoUNet: 1280 channels, 20 heads of 64, context 1024) on 2 videos of 3 frames.
- `guiders`: LinearPredictionGuider and TrianglePredictionGuider on two 14-frame videos.
- svd_manifest.json: every key and shape of the engines svd_xt.yaml and svd_xt_image_decoder.yaml build
  (svd.yaml / svd_image_decoder.yaml differ from them only in the sampler).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.library

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from svd_seed import (FIXTURES, REQUEST, TINY_CONFIG, TINY_TOWER_ARCH, open_clip_config,  # noqa: E402
                      random_state_dict)

MANIFEST = FIXTURES.parent / "svd_manifest.json"
WEIGHT_SEED = {"trajectory": 0, "blocks_1280": 1}


@contextlib.contextmanager
def _without_torchvision_ops():
    """PyPI's torchvision wheels are CUDA builds whose C ops do not load beside CPU torch; its Python
    side (all open_clip imports) still works once the op registrations are skipped. None of
    torchvision's C ops runs here."""
    saved = (torch.library.register_fake, torch.library.register_autograd, torch.library.Library.impl)
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    torch.library.register_autograd = lambda *a, **k: None
    torch.library.Library.impl = lambda self, *a, **k: None
    try:
        yield
    finally:
        torch.library.register_fake, torch.library.register_autograd, torch.library.Library.impl = saved


with _without_torchvision_ops():
    import torchvision  # noqa: F401

import open_clip  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from sgm.modules.diffusionmodules.guiders import LinearPredictionGuider, TrianglePredictionGuider  # noqa: E402
from sgm.modules.diffusionmodules.video_model import VideoResBlock  # noqa: E402
from sgm.modules.video_attention import SpatialVideoTransformer  # noqa: E402
from sgm.util import instantiate_from_config  # noqa: E402


def _seed_commit() -> str:
    import sgm
    root = Path(sgm.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return (root / "SEED_COMMIT").read_text().strip() if (root / "SEED_COMMIT").exists() else "unknown"


def _versions() -> dict[str, str]:
    return {"seed": _seed_commit(), "torch": torch.__version__, "open_clip": open_clip.__version__}


def _keys(module: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


def _randomise(module: torch.nn.Module, seed: int) -> list[tuple[str, list[int]]]:
    keys = _keys(module)
    weights = random_state_dict(keys, seed)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return keys


def _save(name: str, record: dict, arrays: dict[str, torch.Tensor | np.ndarray]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / f"{name}.json").write_text(json.dumps({**record, "versions": _versions()}, indent=1) + "\n")
    np.savez_compressed(FIXTURES / f"{name}.npz", **{
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float32)
        for k, v in arrays.items()})
    print(f"wrote {name}: {', '.join(f'{k} {list(np.shape(v))}' for k, v in arrays.items())}")


def _seed_side(model_cfg: dict, tower_arch: str | None) -> dict:
    """A model section of ours (the seed's target names and params) as the seed builds it: the image
    embedder's tower by open_clip name, no pretrained download, and xformers attention (absent on CPU)
    as its vanilla twin (the same maths)."""
    def walk(node):
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if str(out.get("target", "")).endswith("FrozenOpenCLIPImageEmbedder"):
                params = dict(out.get("params") or {})
                params.pop("tower", None)
                params.update(version=None, **({"arch": tower_arch} if tower_arch else {}))
                out["params"] = params
            if out.get("attn_type") == "vanilla-xformers":
                out["attn_type"] = "vanilla"
            if out.get("spatial_transformer_attn_type") == "softmax-xformers":
                out["spatial_transformer_attn_type"] = "softmax"
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        return node
    cfg = walk(model_cfg)
    cfg.get("params", {}).pop("ckpt_path", None)
    if "sampler_config" in cfg.get("params", {}):
        cfg["params"]["sampler_config"].setdefault("params", {})["device"] = "cpu"  # the seed's default is cuda
    return cfg


def make_trajectory() -> None:
    from sgm_jax.config_files import load_config
    from sgm_jax.configs.inference.tiny_svd import TOWER

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{TINY_TOWER_ARCH}.json").write_text(json.dumps(open_clip_config(TOWER)))
        open_clip.add_model_config(tmp)
        cfg = _seed_side(load_config(str(TINY_CONFIG)).model.to_dict(), TINY_TOWER_ARCH)
        engine = instantiate_from_config(OmegaConf.create(cfg)).eval()
    keys = _randomise(engine, WEIGHT_SEED["trajectory"])

    t, r = REQUEST["num_frames"], REQUEST
    from skimage import data, transform
    photo = transform.resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32)
    image = torch.from_numpy(photo * 2.0 - 1.0).permute(2, 0, 1)[None]
    gen = torch.Generator().manual_seed(0)
    cond_noise = torch.randn(image.shape, generator=gen)
    randn = torch.randn((t, 4, 8, 8), generator=gen)

    # simple_video_sample.py's value_dict / get_batch, for the conditioner's keys
    per_frame = lambda v: torch.tensor([float(v)]).repeat(t)  # noqa: E731
    batch = {"cond_frames_without_noise": image, "cond_frames": image + r["cond_aug"] * cond_noise,
             "fps_id": per_frame(r["fps_id"]), "motion_bucket_id": per_frame(r["motion_bucket_id"]),
             "cond_aug": per_frame(r["cond_aug"]), "num_video_frames": t}
    batch_uc = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        c, uc = engine.conditioner.get_unconditional_conditioning(
            batch, batch_uc=batch_uc, force_uc_zero_embeddings=["cond_frames", "cond_frames_without_noise"])
        for k in ("crossattn", "concat"):
            c[k] = c[k].repeat_interleave(t, dim=0)
            uc[k] = uc[k].repeat_interleave(t, dim=0)
        extra = {"image_only_indicator": torch.zeros(2, t), "num_video_frames": t}

        def denoiser(x, sigma, cond):
            return engine.denoiser(engine.model, x, sigma, cond, **extra)

        # one plain UNet call on the guided batch at the first sigma (localises a trajectory mismatch)
        x_unet = torch.cat([torch.cat([randn, randn]), torch.cat([uc["concat"], c["concat"]])], dim=1)
        timesteps = torch.full((2 * t,), 0.25 * np.log(700.0))
        unet_out = engine.model.diffusion_model(
            x_unet, timesteps=timesteps, context=torch.cat([uc["crossattn"], c["crossattn"]]),
            y=torch.cat([uc["vector"], c["vector"]]), **extra)
        samples_z = engine.sampler(denoiser, randn.clone(), cond=c, uc=uc)  # it scales its input in place
        engine.en_and_decode_n_samples_a_time = r["decoding_t"]
        samples_x = engine.decode_first_stage(samples_z)
    arrays = {"image_nchw": image, "cond_noise_nchw": cond_noise, "randn_nchw": randn,
              **{f"c_{k}": v for k, v in c.items()}, **{f"uc_{k}": v for k, v in uc.items()},
              "unet_x_nchw": x_unet, "unet_timesteps": timesteps, "unet_output_nchw": unet_out,
              "samples_z_nchw": samples_z, "samples_x_nchw": samples_x}
    arrays = {k.replace("_concat", "_concat_nchw"): v for k, v in arrays.items()}
    _save("trajectory", {"config": "configs/inference/tiny_svd.py", "weight_seed": WEIGHT_SEED["trajectory"],
                         "request": REQUEST, "keys": keys, "image": "skimage.data.astronaut(), 64x64, in [-1, 1]",
                         "note": "UNet call: timesteps 0.25*log(700) (c_noise of the first sigma), batch [uc; c]"},
          arrays)


def make_blocks() -> None:
    kw = dict(merge_strategy="learned_with_images", merge_factor=0.5)
    res = VideoResBlock(1280, 1280, 0.0, video_kernel_size=[3, 1, 1], out_channels=1280, **kw).eval()
    attn = SpatialVideoTransformer(1280, 20, 64, depth=1, context_dim=1024, dropout=0.0, ff_in=True,
                                   use_spatial_context=True, use_linear=True, attn_mode="softmax",
                                   **kw).eval()
    block = torch.nn.ModuleDict({"0": res, "1": attn})  # input_blocks.8.0 / input_blocks.8.1
    keys = _randomise(block, WEIGHT_SEED["blocks_1280"])
    gen = torch.Generator().manual_seed(1)
    b, t, hw = 2, 3, 2
    x = torch.randn((b * t, 1280, hw, hw), generator=gen)
    emb = torch.randn((b * t, 1280), generator=gen)
    context = torch.randn((b * t, 1, 1024), generator=gen)
    indicator = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # an image batch mixes without time
    with torch.no_grad():
        h = res(x, emb, num_video_frames=t, image_only_indicator=indicator)
        out = attn(h, context=context, timesteps=t, image_only_indicator=indicator)
    _save("blocks_1280", {"weight_seed": WEIGHT_SEED["blocks_1280"], "keys": keys, "videos": b, "frames": t,
                          "modules": "input_blocks.8 of svd_xt.yaml's VideoUNet: VideoResBlock(1280) then "
                                     "SpatialVideoTransformer(1280, 20 x 64, context 1024, ff_in, spatial context)"},
          {"x_nchw": x, "emb": emb, "context": context, "image_only_indicator": indicator, "res_out_nchw": h,
           "output_nchw": out})


def make_guiders() -> None:
    gen = torch.Generator().manual_seed(2)
    t = 14
    x = torch.randn((2 * 2 * t, 4, 2, 2), generator=gen)  # [uc; c] outputs of two 14-frame videos
    sigma = torch.rand((2 * 2 * t,), generator=gen)
    guiders = {"linear": LinearPredictionGuider(max_scale=2.5, num_frames=t, min_scale=1.0),
               "triangle": TrianglePredictionGuider(max_scale=3.0, num_frames=t, min_scale=1.5,
                                                    period=[1.0, 0.5], period_fusing="max")}
    outputs = {f"{name}_output_nchw": g(x, sigma) for name, g in guiders.items()}
    _save("guiders", {"linear": {"max_scale": 2.5, "num_frames": t, "min_scale": 1.0},
                      "triangle": {"max_scale": 3.0, "num_frames": t, "min_scale": 1.5, "period": [1.0, 0.5],
                                   "period_fusing": "max"}},
          {"x_nchw": x, "sigma": sigma, **outputs})


def _manifest_json(out: dict) -> str:
    """One key per line (diffable), the rest compact."""
    def keys(d: dict) -> str:
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()) + "}"
    parts = [f"{json.dumps(k)}: " + (keys(v) if k.endswith("keys") else json.dumps(v)) for k, v in out.items()]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def make_manifest(seed_root: Path) -> None:
    """Both released layouts, built at full size (about 10 GB of RAM each, one after the other)."""
    states = {}
    for name in ("svd_xt", "svd_xt_image_decoder"):
        cfg = OmegaConf.to_container(OmegaConf.load(seed_root / "scripts/sampling/configs" / f"{name}.yaml"))
        # simple_video_sample.py's load_model sets the guider's frame count (25 for svd_xt)
        cfg["model"]["params"]["sampler_config"]["params"]["guider_config"]["params"]["num_frames"] = 25
        engine = instantiate_from_config(OmegaConf.create(_seed_side(cfg["model"], None)))
        states[name] = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in engine.state_dict().items()}
        del engine
    video, image = states["svd_xt"], states["svd_xt_image_decoder"]
    dtypes = {d for _, d in [*video.values(), *image.values()]}
    assert dtypes == {"float32"}, dtypes
    shared = {k for k in video if not k.startswith("first_stage_model.")}
    assert {k: video[k] for k in shared} == {k: v for k, v in image.items() if not k.startswith("first_stage_model.")}
    count = lambda d: int(sum(np.prod(shape) for shape, _ in d.values()))  # noqa: E731
    out = {"source": "state_dict() of the DiffusionEngine the seed builds from scripts/sampling/configs/svd_xt.yaml "
                     "and svd_xt_image_decoder.yaml (random init, no checkpoint): every key of svd_xt.safetensors "
                     "(svd.safetensors: the same engine) and its shape; the image-decoder files differ only in "
                     "first_stage_model.*",
           "versions": _versions(), "dtype": "float32",
           "num_params": {"svd_xt": count(video), "svd_xt_image_decoder": count(image)},
           "keys": {k: shape for k, (shape, _) in video.items()},
           "image_decoder_first_stage_keys": {k: shape for k, (shape, _) in image.items()
                                              if k.startswith("first_stage_model.")}}
    MANIFEST.write_text(_manifest_json(out))
    print(f"wrote {MANIFEST}: {len(video)} keys ({out['num_params']['svd_xt']:,} values), image decoder "
          f"{len(image)} ({out['num_params']['svd_xt_image_decoder']:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-manifest", action="store_true", help="skip the full-size engines (~10 GB of RAM)")
    args = parser.parse_args()
    torch.manual_seed(0)
    make_guiders()
    make_blocks()
    make_trajectory()
    if not args.skip_manifest:
        import sgm
        make_manifest(Path(sgm.__file__).resolve().parents[1])


if __name__ == "__main__":
    main()
