"""Running pytorch-fid itself, as the reference for tests and benchmarks (never needed for
evaluation: sgm_jax computes FID without PyTorch).

pytorch-fid imports torchvision. PyPI's torchvision wheel is built against CUDA torch, and its C
extension does not load beside the CPU build of torch; its import then fails while registering
fake kernels for C ops that were never loaded (`torchvision::nms`). pytorch-fid needs none of
those ops, only torchvision's Python Inception3 blocks. `import_pytorch_fid()` imports torchvision
with those registrations skipped. Both packages are kept out of the venv (a torchvision that
cannot import breaks transformers' CLIP imports there) in a folder put on PYTHONPATH of a
subprocess:

    pip install --no-deps --target ~/.cache/sgm_jax/torch_refs pytorch-fid==0.3.0 torchvision==0.28.0

(`$SGM_JAX_TORCH_REFS` overrides the folder; torchvision 0.28 is the release for torch 2.13.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REFS_DIR = Path(os.environ.get("SGM_JAX_TORCH_REFS", Path.home() / ".cache" / "sgm_jax" / "torch_refs"))
INSTALL_HINT = (f"pip install --no-deps --target {REFS_DIR} pytorch-fid==0.3.0 torchvision==0.28.0")


def import_pytorch_fid() -> Any:
    """`pytorch_fid.inception` (importing torchvision without its C-op fake registrations)."""
    import torch

    register_fake = torch.library.register_fake

    def skip_torchvision_ops(op, func=None, /, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return func if func is not None else (lambda fn: fn)
        return register_fake(op, func, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake
    from pytorch_fid import inception

    return inception


def subprocess_env() -> dict[str, str] | None:
    """Environment for a subprocess that imports pytorch_fid: as installed, or from REFS_DIR
    (prepended to PYTHONPATH); None when it is in neither place."""
    import importlib.util

    env = dict(os.environ)
    if importlib.util.find_spec("pytorch_fid") is not None and importlib.util.find_spec("torchvision") is not None:
        return env
    if not (REFS_DIR / "pytorch_fid").is_dir() or not (REFS_DIR / "torchvision").is_dir():
        return None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REFS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return env


def random_weights_file(torch_home: str | os.PathLike, seed: int = 0) -> Path:
    """Write well-scaled random weights (He-normal convs, batch-norm scale / variance in
    [0.5, 1.5]) in the layout of pytorch-fid's weight file, where pytorch-fid's loader looks for
    it under `torch_home` (set TORCH_HOME to it before building `InceptionV3`)."""
    import torch
    import torchvision

    inception = import_pytorch_fid()
    skeleton = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for k, v in skeleton.state_dict().items():
        if k.endswith("num_batches_tracked"):
            weights[k] = v
        elif k.endswith("conv.weight"):
            weights[k] = torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith(("running_var", "bn.weight")):
            weights[k] = 0.5 + torch.rand(v.shape, generator=gen)
        else:
            weights[k] = 0.1 * torch.randn(v.shape, generator=gen)
    path = Path(torch_home) / "hub" / "checkpoints" / inception.FID_WEIGHTS_URL.split("/")[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path)
    return path
