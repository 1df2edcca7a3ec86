"""The compiled sampling function and how a request is fed to it (chunks, sharding, noise, progress).

One jitted function per (sampler spec, stage flags):
    (params, x0, noise, c, uc, key, scale) -> uint8 images [B, H, W, 3] or latents [B, h, w, c]
    [img2img noising] -> sampler loop (denoise + CFG every step) -> [VAE decode -> uint8]
It is compiled ahead of time once per batch shape (the compile time is recorded); prompts,
seeds and the CFG scale are arguments, so changing them never recompiles.

Progress: with `step_progress` the sampler reports every step through a host callback. JAX
never writes executables holding host callbacks to its persistent compilation cache, so by
default (step_progress=None) per-step callbacks are compiled in only when that cache is off;
with the cache on, a chunk's steps are reported when the chunk finishes and the loop is
cached across runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import multihost
from sgm_jax.engine import DiffusionEngine
from sgm_jax.images import to_uint8
from sgm_jax.mesh_context import traced_on
from sgm_jax.parallel import batch_sharding, replicated

from .sampling import SamplerSpec

Cond = dict[str, jax.Array]


def persistent_cache_enabled() -> bool:
    return bool(jax.config.jax_compilation_cache_dir)


@dataclass(frozen=True)
class StepEvent:
    """Passed to a run's `progress` callback (on the host) for every sampler step."""

    stage: str   # the pipeline's name
    chunk: int   # which batch of this request, 0-based
    chunks: int
    step: int    # 0-based step within the chunk
    steps: int


class RequestCancelled(Exception):
    """Raised by a run's `progress` callback to stop the request: the run stops when the chunk in
    flight ends (a compiled loop cannot be left midway) and re-raises it."""


@dataclass
class Timing:
    stage: str
    compile_s: float
    run_s: float


class ProgressRelay:
    """The sampler's host callback: one fixed object (so compiled loops stay valid) forwarding
    to whatever listener the current run has set."""

    def __init__(self) -> None:
        self.listener: Callable[[int], None] | None = None

    def __call__(self, index: Any) -> None:
        if self.listener is not None:
            self.listener(int(index))


class SamplingRunner:
    """Runs one model's sampling function over a data-parallel mesh."""

    def __init__(self, engine: DiffusionEngine, mesh: jax.sharding.Mesh, name: str,
                 step_progress: bool | None = None) -> None:
        self.engine, self.mesh, self.name = engine, mesh, name
        self.step_progress = step_progress
        self.relay = ProgressRelay()
        self.timings: list[Timing] = []
        self._fns: dict[tuple, Callable] = {}
        self._executables: dict[tuple, Any] = {}
        self._noise_fns: dict[tuple, Callable] = {}

    def sampling_fn(self, spec: SamplerSpec, has_init: bool, add_noise: bool, decode: bool,
                    with_callback: bool) -> Callable:
        """jit of (params, x0, noise, c, uc, key, scale) -> uint8 [B,H,W,3] (decode) or latents [B,h,w,c].

        has_init: start from latents x0 (img2img / refiner) as the seed's do_img2img:
        x = (x0 + noise * sigma_0) / sqrt(1 + sigma_0^2) (noise only with add_noise), which the
        sampler multiplies back by sqrt(1 + sigma_0^2). Otherwise x = noise (unit Gaussian).
        """
        key = (spec, has_init, add_noise, decode, with_callback)
        if key not in self._fns:
            engine = self.engine
            progress = self.relay if with_callback else None
            sigma0 = np.float32(spec.sigmas()[0])
            norm = np.sqrt(np.float32(1.0) + sigma0 * sigma0)  # float32, as the seed's torch op
            no_steps = spec.num_loop == 0

            def run(params, x0, noise, cond, uc, rng, scale):
                if has_init:
                    x = (x0 + noise * sigma0 if add_noise else x0) / norm
                else:
                    x = noise
                if no_steps:  # strength 0: a single sigma, no step; the sampler would only rescale
                    z = x * norm
                else:
                    z = spec.build(scale)(lambda x_, s, c: engine.denoise(params, x_, s, c), x, cond, uc=uc,
                                          key=rng, progress=progress)
                return to_uint8(engine.decode_first_stage(params, z)) if decode else z

            self._fns[key] = jax.jit(traced_on(self.mesh, run))
        return self._fns[key]

    def noise(self, key: jax.Array, indices: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
        """[len(indices), *shape] N(0, I), row i from fold_in(key, indices[i]), split over the mesh."""
        sharding = batch_sharding(self.mesh)
        if shape not in self._noise_fns:
            def draw(k, idx):
                return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(idx)

            self._noise_fns[shape] = jax.jit(draw, out_shardings=sharding)
        return self._noise_fns[shape](key, jax.device_put(indices, sharding))

    def batched(self, tree: Any, rows: np.ndarray) -> Any:
        """Pick `rows` of every [N, ...] leaf (N = 1 broadcasts) and split them over the mesh."""
        sharding = batch_sharding(self.mesh)

        def pick(x):
            x = jnp.asarray(x)
            x = jnp.broadcast_to(x, (len(rows),) + x.shape[1:]) if x.shape[0] == 1 else x[np.minimum(rows, len(x) - 1)]
            return jax.device_put(x, sharding)

        return jax.tree_util.tree_map(pick, tree)

    def run(self, params: Any, spec: SamplerSpec, c: Cond, uc: Cond, *, num: int, latent_shape: tuple[int, ...],
            seed_key: jax.Array, cfg_scale: float, x0: Any = None, add_noise: bool = True, decode: bool = True,
            batch_size: int | None = None, progress: Callable[[StepEvent], None] | None = None,
            first_index: int = 0) -> np.ndarray:
        """All `num` images of one stage, in chunks of `batch_size` (rounded up to the device count).

        first_index: these are images first_index ... first_index + num - 1 of a larger request
        (a multiple of the chunk size): the same pixels as that request's, without holding it all.

        params: {"model", "first_stage"} on the mesh; c / uc: batch-1 conditioning; latent_shape:
        [h, w, c] of one latent; x0: None (txt2img) or latents [1 or num, h, w, c]. Returns
        uint8 [num, H, W, 3] (decode) or float32 latents [num, h, w, c].
        """
        ndev = self.mesh.size
        bs = -(-int(batch_size or num) // ndev) * ndev
        with_callback = self.step_progress if self.step_progress is not None else not persistent_cache_enabled()
        static = (spec, x0 is not None, add_noise, decode, with_callback and progress is not None)
        fn = self.sampling_fn(*static)
        noise_key, sampler_key = jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1)
        scale = jax.device_put(jnp.asarray(cfg_scale, jnp.float32), replicated(self.mesh))
        steps, chunks = spec.num_loop, -(-num // bs)
        if first_index % bs:
            raise ValueError(f"first_index {first_index} must be a multiple of the batch size {bs}")
        outs: list[np.ndarray] = []
        cancelled: list[RequestCancelled] = []

        def step_report(i: int, chunk: int) -> None:  # also called from inside the compiled loop: never raises
            if not cancelled:
                try:
                    progress(StepEvent(self.name, chunk, chunks, i, steps))
                except RequestCancelled as e:
                    cancelled.append(e)

        try:
            for chunk, start in enumerate(range(0, num, bs)):
                report = None if progress is None else (lambda i, c_=chunk: step_report(i, c_))
                self.relay.listener = report
                rows = np.arange(start, start + bs, dtype=np.int32)  # rows >= num are padding
                index = np.arange(first_index + start, first_index + start + bs, dtype=np.int32)
                args = (params,
                        None if x0 is None else self.batched(x0, rows),
                        self.noise(noise_key, index, tuple(latent_shape)) if x0 is None or add_noise else None,
                        self.batched(c, rows), self.batched(uc, rows),
                        jax.random.fold_in(sampler_key, (first_index + start) // bs), scale)
                exe = self._executable(fn, static, args)
                t0 = time.perf_counter()
                out = np.asarray(jax.block_until_ready(exe(*args)))
                self.timings.append(Timing(f"{self.name}: sample", 0.0, time.perf_counter() - t0))
                if report is not None and not static[-1]:  # no in-loop callback: report the chunk's steps now
                    for i in range(steps):
                        report(i)
                outs.append(out[: min(bs, num - start)])
                if cancelled:
                    raise cancelled[0]
        finally:
            self.relay.listener = None
        return np.concatenate(outs, axis=0)

    def _executable(self, fn: Callable, static: tuple, args: tuple) -> Any:
        """AOT-compiled `fn` for these argument shapes / shardings (compile time recorded)."""
        # params (args[0]) are fixed per runner; the rest decides the executable
        sig = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype), getattr(x, "sharding", None)), args[1:])
        key = (static, str(sig))
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = multihost.compile_together(fn, *args, name=f"{self.name}:sample")
            self.timings.append(Timing(f"{self.name}: compile", time.perf_counter() - t0, 0.0))
        return self._executables[key]
