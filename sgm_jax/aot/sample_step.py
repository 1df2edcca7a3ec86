"""The sampling call sample.py would run (txt2img: sampler loop with CFG + VAE decode), compiled
for a TPU slice from shapes alone.

The function is `SamplingRunner.sampling_fn`, the one sample.py's Pipeline jits; the engine is
built by the same `engine_for_sampling`; its arguments are ShapeDtypeStructs shaped as
`SamplingRunner.run` builds them (params replicated, the batch split over one host's chips:
each host of a slice samples on its own local devices, as sample.py does).

XLA's cost analysis counts a loop body once, so the sampler's remaining steps are added from a
second compile of one guided denoising step (the loop body's UNet call with its CFG batch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import mesh_context, parallel
from sgm_jax.checkpointing.frozen import abstract_full_params, floating_as
from sgm_jax.inference.conditioning import ConditioningValues, PromptEncoder
from sgm_jax.inference.pipeline import check_size, engine_for_sampling
from sgm_jax.inference.runner import SamplingRunner
from sgm_jax.inference.sampling import SamplerSpec
from sgm_jax.sampling_defaults import SamplingDefaults

from .stand_in import ShapeTokenizer

# samplers that call the denoiser twice per step (the seed's Heun and DPM++ 2S)
TWO_EVALS = {"heun_edm", "dpmpp2s_ancestral"}


def _abstract(x: Any, sharding: Any, dtype: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(x)), dtype or x.dtype, sharding=sharding)


def prepare_sampling(config: Any, devices: list[Any], *, width: int | None, height: int | None,
                     steps: int | None, num: int | None, sampler: str | None = None, dtype: str | None = None,
                     param_dtype: str = "float32", name: str = "model") -> tuple[dict[str, Any], dict[str, Any]]:
    """(argument groups, facts) for `num` images of width x height; facts["trace"]: () -> the traced
    call (jax.stages.Traced), facts["body"]: () -> one loop step traced (None when the loop runs once)."""
    defaults = SamplingDefaults.from_config(config)
    width, height = int(width or defaults.width), int(height or defaults.height)
    engine = engine_for_sampling(config, dtype or defaults.dtype)
    check_size(engine, width, height, name)
    local = [d for d in devices if d.process_index == devices[0].process_index]
    mesh = parallel.make_mesh(devices=local)
    num = int(num or defaults.batch_per_device * mesh.size)
    bs = -(-num // mesh.size) * mesh.size  # SamplingRunner.run rounds a call up to the device count
    spec = SamplerSpec.create(sampler or defaults.sampler, int(steps or defaults.num_steps), defaults.discretization)

    prompts = PromptEncoder(engine.conditioner, ShapeTokenizer())
    values = ConditioningValues.for_size("a prompt", "", width, height)
    batch, batch_uc = prompts.tokenized(values)
    example = {**batch, engine.input_key: np.zeros((1, height, width, 3), np.float32)}
    full = floating_as(abstract_full_params(engine, example), param_dtype)
    zero = defaults.zero_uc_keys(prompts.keys)
    c, uc = jax.eval_shape(prompts._encode_fn(tuple(zero)), full.get("conditioner", {}), batch, batch_uc)

    repl, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    params = jax.tree_util.tree_map(lambda a: _abstract(a, repl),
                                    {k: v for k, v in full.items() if k != "conditioner"})
    rows = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct((bs,) + tuple(a.shape[1:]), a.dtype, sharding=split), tree)
    latent = tuple(engine.latent_shape((bs, height, width, 3)))
    noise = jax.ShapeDtypeStruct(latent, jnp.float32, sharding=split)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl)

    runner = SamplingRunner(engine, mesh, name, step_progress=False)
    fn = runner.sampling_fn(spec, False, True, True, False)
    body = None
    per_step = 2 if spec.name in TWO_EVALS else 1
    evals = spec.num_loop * per_step
    if evals > per_step:  # one guided denoising step: what the loop body runs

        def one_step(p, x, sigma, cond, ucond, s):
            g = spec.make_guider(s)
            xi, si, ci = g.prepare_inputs(x, sigma, cond, ucond)
            return g(engine.denoise(p, xi, si, ci), sigma)

        sigma = jax.ShapeDtypeStruct((bs,), jnp.float32, sharding=split)
        step_fn = jax.jit(mesh_context.traced_on(mesh, one_step))
        body = lambda: step_fn.trace(params, noise, sigma, rows(c), rows(uc), scale)  # noqa: E731
    groups = {"parameters": params["model"], "first stage": params.get("first_stage", {}),
              "batch": {"noise": noise, "c": rows(c), "uc": rows(uc)}}
    facts = {"mesh": mesh, "devices": local, "batch_size": bs, "num": num, "spec": spec, "evals": evals, "per_step": per_step,
             "size": (width, height), "body": body,
             "trace": lambda: fn.trace(params, None, noise, rows(c), rows(uc), key, scale)}
    return groups, facts
