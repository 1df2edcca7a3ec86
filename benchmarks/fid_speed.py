"""FID feature extraction speed: sgm_jax's Flax InceptionV3 beside pytorch-fid's PyTorch model,
on the same real MNIST digits with the same weights, at batch 64.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth when present (see
sgm_jax.convert.inception), else the same well-scaled random weights on both sides (speed does
not depend on the values). Also reports how far apart the two feature sets are.
pytorch-fid runs in a subprocess (see sgm_jax/evaluation/pytorch_fid_ref.py for installing it).

    nice -n 5 python benchmarks/fid_speed.py --images 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def torch_worker(images_path: str, out_path: str, batch: int) -> None:
    """Runs in the subprocess: pytorch-fid's InceptionV3 (weights from $TORCH_HOME) over the images."""
    import torch

    from sgm_jax.evaluation.pytorch_fid_ref import import_pytorch_fid

    pfi = import_pytorch_fid()
    images = np.load(images_path)["images"]  # uint8 NHWC
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
    model = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x[:batch])  # warm-up
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = [model(x[i:i + batch])[0][:, :, 0, 0].numpy() for i in range(0, len(x), batch)]
        seconds = time.perf_counter() - t0
    np.savez(out_path, features=np.concatenate(feats), seconds=seconds, warm=warm, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="digits to featurise (a multiple of --batch)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--weights", help="pytorch-fid's .pth (default: the usual places, else random)")
    parser.add_argument("--torch-worker", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        return torch_worker(*args.torch_worker, args.batch)

    import jax

    from sgm_jax.convert.inception import export_inception, load_inception_params
    from sgm_jax.data import MnistDataset
    from sgm_jax.evaluation.fid import InceptionFeatures
    from sgm_jax.evaluation.pytorch_fid_ref import INSTALL_HINT, subprocess_env
    from sgm_jax.nn.inception import random_inception_params

    try:
        params, weights = load_inception_params(args.weights), "pytorch-fid's pt_inception-2015-12-05"
    except FileNotFoundError:
        params, weights = random_inception_params(0), "random (pytorch-fid's file absent)"
    data = MnistDataset(None, split="test")
    images = np.repeat(data.images[: args.images], 3, axis=-1)  # grey -> RGB, as PIL's convert("RGB")

    extractor = InceptionFeatures(params, batch_size=args.batch)
    t0 = time.perf_counter()
    extractor(images[: args.batch])  # compile + one batch
    jax_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_feats = extractor(images)
    jax_seconds = time.perf_counter() - t0

    torch_row, diff = None, None
    env = subprocess_env()
    if env is None:
        print(f"pytorch-fid peer skipped: {INSTALL_HINT}")
    else:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "images.npz", images=images)
            env["TORCH_HOME"] = str(Path(tmp) / "torch_home")
            pth = Path(env["TORCH_HOME"]) / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
            pth.parent.mkdir(parents=True)
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in export_inception(params).items()}, pth)
            subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--torch-worker",
                            str(Path(tmp) / "images.npz"), str(Path(tmp) / "out.npz")], env=env, check=True)
            out = dict(np.load(Path(tmp) / "out.npz"))
        torch_row = (float(out["seconds"]), float(out["warm"]), int(out["threads"]))
        diff = float(np.abs(jax_feats - out["features"]).max() / np.abs(out["features"]).max())

    n = len(images)
    print(f"\nFID feature extraction, {n} MNIST digits (28x28 -> 299x299), batch {args.batch}, weights: {weights}")
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| implementation | images/s | ms / image | first batch (s) |")
    print("|---|---:|---:|---:|")
    print(f"| sgm_jax (Flax, XLA CPU) | {n / jax_seconds:.1f} | {1000 * jax_seconds / n:.1f} "
          f"| {jax_warm:.1f} (compile) |")
    if torch_row is not None:
        sec, warm, threads = torch_row
        print(f"| pytorch-fid (PyTorch {torch.__version__}, {threads} threads) | {n / sec:.1f} | {1000 * sec / n:.1f} "
              f"| {warm:.1f} |")
        print(f"max |features_jax - features_torch| / max |features_torch| = {diff:.2e}")
    print(json.dumps({"images": n, "jax_images_per_s": n / jax_seconds,
                      "torch_images_per_s": n / torch_row[0] if torch_row else None, "max_rel_diff": diff}))


if __name__ == "__main__":
    main()
