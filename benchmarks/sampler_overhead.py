"""Loop overhead of the compiled samplers.

For each sampler: time of one jitted 50-step sampling call with a cheap denoiser, against the
same denoiser (jitted) called 50 times from Python: the floor a sampler loop could reach.
Ratio ~1 (or below: no per-step dispatch) means the loop itself costs nothing.

    python benchmarks/sampler_overhead.py [--steps 50] [--shape 4,64,64,4]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from sgm_jax.diffusion import samplers as smp
from sgm_jax.diffusion.guiders import VanillaCFG


def denoiser(x, sigma, cond):
    """Cheap but not free: one 3x3 depthwise blur plus the Gaussian-data shrinkage."""
    kernel = jnp.full((3, 3, 1, x.shape[-1]), 1.0 / 9.0, x.dtype)
    blurred = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           feature_group_count=x.shape[-1])
    return blurred * 0.25 / (0.25 + sigma[:, None, None, None] ** 2)


def best_of(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shape", default="4,64,64,4")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    x = jax.random.normal(jax.random.key(0), shape)
    key = jax.random.key(1)
    cond = {"vector": jnp.zeros((shape[0], 8))}
    sigma = jnp.ones((shape[0],))
    one_call = jax.jit(denoiser)

    def python_loop(evals: int):
        def run():
            y = x
            for _ in range(evals):
                y = one_call(y, sigma, cond)
            return y
        return run

    print(f"device: {jax.devices()[0].device_kind}, x {shape}, {args.steps} steps")
    print(f"{'sampler':<26}{'evals':>6}{'sampler ms':>12}{'N calls ms':>12}{'ratio':>8}")
    cases = [(cls.__name__, cls(num_steps=args.steps)) for cls in
             (smp.EulerEDMSampler, smp.HeunEDMSampler, smp.EulerAncestralSampler, smp.DPMPP2SAncestralSampler,
              smp.DPMPP2MSampler, smp.LinearMultistepSampler)]
    cases.append(("EulerEDM + VanillaCFG(5)", smp.EulerEDMSampler(num_steps=args.steps, guider=VanillaCFG(5.0))))
    for name, sampler in cases:
        evals = args.steps * (2 if isinstance(sampler, (smp.HeunEDMSampler, smp.DPMPP2SAncestralSampler)) else 1) - (
            1 if isinstance(sampler, (smp.HeunEDMSampler, smp.DPMPP2SAncestralSampler)) else 0)
        uc = cond if isinstance(sampler.guider, VanillaCFG) else None
        run = jax.jit(lambda x_, k_, s=sampler, u=uc: s(denoiser, x_, cond, uc=u, key=k_))
        t_sampler = best_of(lambda: run(x, key))
        if uc is not None:  # CFG evaluates a doubled batch
            x2, s2, c2 = jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), {"vector": jnp.zeros((2 * shape[0], 8))}
            t_calls = best_of(lambda: [one_call(x2, s2, c2) for _ in range(evals)][-1])
        else:
            t_calls = best_of(python_loop(evals))
        print(f"{name:<26}{evals:>6}{t_sampler * 1e3:>12.2f}{t_calls * 1e3:>12.2f}{t_sampler / t_calls:>8.2f}")


if __name__ == "__main__":
    main()
