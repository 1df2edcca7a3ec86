"""What the released SVD-XT needs in memory, from abstract shapes alone (no weights, no accelerator):
its parameters per part in float32 and bfloat16, and the largest arrays one guided denoiser step
(25 frames of 576x1024, [uc; c] doubled: the VideoUNet at batch 50) and one decode chunk of
`decoding_t` frames create, read from the traced jaxpr, for each attention implementation.

    python benchmarks/svd_memory.py [--config inference/svd_xt] [--decoding-t 14] [--attn xla,tpu]

A lower bound on the peak (the weights plus the single largest array), not the compiler's schedule:
XLA may fuse an array away, and several arrays are live at once.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.config_files import load_config
from sgm_jax.convert.layout import abstract_engine_params, engine_parts
from sgm_jax.inference.pipeline import engine_for_sampling
from sgm_jax.sampling_defaults import SamplingDefaults

GB = 1e9


def abstract_params(config: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """(the converted params tree as ShapeDtypeStructs, parameters per part)."""
    parts = engine_parts(config)
    counts = {part.name: sum(int(np.prod(shape)) for shape in part.shapes.values()) for part in parts}
    return abstract_engine_params(parts, dtype), counts


def largest_arrays(fn: Any, *args: Any, top: int = 4) -> list[tuple[float, str, int]]:
    """(GB, "dtype[shape]", how many) of the largest intermediate arrays of fn's jaxpr, sub-jaxprs included."""
    sizes: collections.Counter = collections.Counter()

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                aval = v.aval
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    sizes[(int(np.prod(aval.shape)) * aval.dtype.itemsize, f"{aval.dtype}{list(aval.shape)}")] += 1
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return [(b / GB, name, n) for (b, name), n in sorted(sizes.items(), reverse=True)[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="inference/svd_xt")
    p.add_argument("--decoding-t", type=int, default=None, help="frames per decode chunk (default: the config's)")
    p.add_argument("--attn", default="xla,tpu", help="attention implementations to trace")
    args = p.parse_args()

    config = load_config(args.config)
    d = SamplingDefaults.from_config(config)
    t, h, w = d.num_frames, d.height // 8, d.width // 8
    chunk = args.decoding_t or d.decoding_t
    params, counts = abstract_params(config, jnp.bfloat16)  # the same for every attention implementation
    total = sum(counts.values())
    print(f"{args.config}: {t} frames of {d.width}x{d.height}, decoding_t {chunk}")
    print("| part | parameters | float32 GB | bfloat16 GB |\n|---|---:|---:|---:|")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) + [("total", total)]:
        print(f"| {name} | {n:,} | {4 * n / GB:.2f} | {2 * n / GB:.2f} |")

    print("\n| attention | computation | largest arrays (GB, dtype[shape], count) | bf16 weights + largest, GB |")
    print("|---|---|---|---:|")
    for attn in args.attn.split(","):
        cfg = load_config(args.config)
        cfg.model.params.network_config.params.attn_implementation = attn
        engine = engine_for_sampling(cfg, "bfloat16")
        x = jax.ShapeDtypeStruct((2 * t, h, w, 4), jnp.float32)
        cond = {"crossattn": jax.ShapeDtypeStruct((2 * t, 1, 1024), jnp.float32),
                "vector": jax.ShapeDtypeStruct((2 * t, 768), jnp.float32),
                "concat": jax.ShapeDtypeStruct((2 * t, h, w, 4), jnp.float32),
                "image_only_indicator": jax.ShapeDtypeStruct((2, t), jnp.float32)}
        sigma = jax.ShapeDtypeStruct((2 * t,), jnp.float32)
        z = jax.ShapeDtypeStruct((chunk, h, w, 4), jnp.float32)
        jobs = {"guided denoiser step (VideoUNet, batch 2x%d)" % t:
                (lambda p, x, s, c: engine.denoise(p, x, s, c), params, x, sigma, cond),
                f"decode one chunk of {chunk} frames": (lambda p, z: engine.decode_first_stage(p, z), params, z)}
        for label, (fn, *fargs) in jobs.items():
            try:
                top = largest_arrays(fn, *fargs)
            except Exception as e:  # e.g. an implementation this jax cannot trace here
                print(f"| {attn} | {label} | not traced: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
                continue
            shown = "; ".join(f"{gb:.2f} {name} x{n}" for gb, name, n in top)
            print(f"| {attn} | {label} | {shown} | {2 * total / GB + top[0][0]:.1f} |")


if __name__ == "__main__":
    main()
