"""SDXL base UNet in bf16, sgm_jax against diffusers on one GPU: forward, train step, sampling loop.

    python benchmarks/sdxl_gpu_speed.py              # on a CUDA machine (jax[cuda], CUDA torch, diffusers)
    python benchmarks/sdxl_gpu_speed.py --gpu-tiny   # the same code at toy size on any device

(c) GPU only (jax on gpu and torch.cuda available): SDXL base UNet (2.6 B) in bf16, JAX against
diffusers, each framework in its own subprocess (so neither allocator starves the other):
  - one denoising call at 1024^2 with CFG (latents [2,128,128,4]),
  - one train step at batch 1 (float32 params, bf16 compute, gradient checkpointing, AdamW),
  - a 30-step Euler sampling loop with CFG (LegacyDDPM sigmas, eps-prediction, scale 5):
    s/image, ratio and achieved TFLOP/s against the device's bf16 dense peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

# Before jax is imported: on a GPU, JAX must not grab 75% of the memory that torch also needs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import torch_peer as tp  # noqa: E402
from sgm_jax.nn.unet import UNetModel  # noqa: E402
from timing import flops_of, time_calls  # noqa: E402

# bf16 dense tensor-core peaks (TFLOP/s), matched by substring of device_kind, first match wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("GH200", 989.4), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0),  # V100: fp16
]


def peak_tflops(device_kind: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


# --------------------------------------------------------------------------------------------
# (c) GPU: SDXL, each framework in its own subprocess
# --------------------------------------------------------------------------------------------

def sdxl_setup(tiny: bool) -> dict:
    """Configs and sizes for section (c); `tiny` shrinks everything to check the code on CPU."""
    sgm, peer = tp.sdxl_configs()
    sgm = {k: v for k, v in sgm.items() if k != "spatial_transformer_attn_type"}
    sizes = dict(latent=128, seq=77, steps=30, cfg_scale=5.0, rounds=3)
    if tiny:
        sgm.update(model_channels=32, transformer_depth=[1, 1, 2], context_dim=64, num_head_channels=16)
        peer = tp.diffusers_from_sgm(sgm, sample_size=8)
        peer.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=sgm["adm_in_channels"])
        sizes.update(latent=8, seq=7, steps=3, rounds=2)
    return dict(sgm=sgm, peer=peer, **sizes)


def sdxl_sigmas(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas incl. the final 0, the 1000 training sigmas): the seed's SDXL sampling schedule."""
    from sgm_jax.diffusion import LegacyDDPMDiscretization

    disc = LegacyDDPMDiscretization()
    return np.asarray(disc(steps), np.float32), np.asarray(disc(1000, do_append_zero=False, flip=True), np.float32)


def gpu_part_jax(setup: dict, out: dict) -> None:
    from sgm_jax.diffusion import DiscreteDenoiser, EpsScaling, EulerEDMSampler, LegacyDDPMDiscretization, VanillaCFG

    dev = jax.devices()[0]
    out["device"] = dev.device_kind
    bf16 = jnp.bfloat16
    lat, seq = setup["latent"], setup["seq"]
    sgm = dict(setup["sgm"])
    impl = "cudnn" if dev.platform == "gpu" else None
    rng = np.random.default_rng(0)
    ctx = jnp.asarray(rng.standard_normal((2, seq, sgm["context_dim"])), bf16)
    vec = jnp.asarray(rng.standard_normal((2, sgm["adm_in_channels"])), bf16)
    x2 = jnp.asarray(rng.standard_normal((2, lat, lat, 4)), bf16)
    t2 = jnp.asarray([500.0, 500.0], jnp.float32)

    def build(attn):
        model = UNetModel(**sgm, dtype=bf16, attn_implementation=attn)
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))["params"]
        return model, abstract

    model, abstract = build(impl)
    out["params"] = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract))
    init = jax.jit(lambda k: model.init(k, **model.example_inputs())["params"])
    params32 = init(jax.random.key(0))
    params16 = jax.jit(lambda p: jax.tree_util.tree_map(lambda a: a.astype(bf16), p))(params32)

    def fwd_fn(m):
        return jax.jit(lambda p, x, t, c, y: m.apply({"params": p}, x, t, context=c, y=y))

    fwd = fwd_fn(model)
    try:
        compiled = fwd.lower(params16, x2, t2, ctx, vec).compile()
    except Exception as e:  # cuDNN attention unavailable for these shapes / this build
        out["attn_fallback"] = f"{impl} -> xla ({type(e).__name__}: {str(e)[:200]})"
        model, _ = build("xla" if impl else None)
        fwd = fwd_fn(model)
        compiled = fwd.lower(params16, x2, t2, ctx, vec).compile()
    out["attn_implementation"] = model.attn_implementation
    out["fwd_flops"] = flops_of(compiled)
    jax.block_until_ready(compiled(params16, x2, t2, ctx, vec))
    out["fwd_s"] = min(time_calls(lambda: jax.block_until_ready(compiled(params16, x2, t2, ctx, vec)), 3)
                       for _ in range(setup["rounds"]))

    # 30-step Euler sampling loop with CFG, one image: the whole loop is one jitted scan.
    disc = LegacyDDPMDiscretization()
    sampler = EulerEDMSampler(num_steps=setup["steps"], discretization=disc, guider=VanillaCFG(setup["cfg_scale"]))
    denoiser = DiscreteDenoiser(scaling=EpsScaling(), discretization=disc)

    def sample(p, noise, c, uc):
        def network(x, c_noise, cond):
            return model.apply({"params": p}, x.astype(bf16), c_noise, context=cond["crossattn"],
                               y=cond["vector"]).astype(jnp.float32)

        return sampler(lambda x, s, cond: denoiser(network, x, s, cond), noise, c, uc)

    cond = {"crossattn": ctx[1:], "vector": vec[1:]}
    uc = {"crossattn": ctx[:1], "vector": vec[:1]}
    noise = jnp.asarray(rng.standard_normal((1, lat, lat, 4)), jnp.float32)
    sample_c = jax.jit(sample).lower(params16, noise, cond, uc).compile()
    jax.block_until_ready(sample_c(params16, noise, cond, uc))
    out["sample_s"] = min(time_calls(lambda: jax.block_until_ready(sample_c(params16, noise, cond, uc)), 1)
                          for _ in range(setup["rounds"]))
    del sample_c, compiled, params16
    gc.collect()

    # Train step: float32 params and AdamW state, bf16 compute, remat as the config (use_checkpoint).
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params32)
    target = jnp.asarray(rng.standard_normal((1, lat, lat, 4)), jnp.float32)

    def step(p, o, x, t, c, y, tgt):
        loss_fn = lambda q: jnp.mean(jnp.square(model.apply({"params": q}, x, t, context=c, y=y).astype(jnp.float32)
                                                - tgt))
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    try:
        step_c = jax.jit(step, donate_argnums=(0, 1)).lower(params32, opt_state, x2[:1], t2[:1], ctx[:1], vec[:1],
                                                           target).compile()
        out["train_flops"] = flops_of(step_c)
        state = (params32, opt_state)
        del params32, opt_state

        def one():
            nonlocal state
            p, o, loss = step_c(*state, x2[:1], t2[:1], ctx[:1], vec[:1], target)
            state = (p, o)
            jax.block_until_ready(loss)

        one()
        out["train_s"] = min(time_calls(one, 2) for _ in range(setup["rounds"]))
    except Exception as e:  # e.g. out of memory
        out["train_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def gpu_part_torch(setup: dict, out: dict) -> None:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bf16 = torch.bfloat16
    lat, seq, sgm = setup["latent"], setup["seq"], setup["sgm"]
    rng = np.random.default_rng(0)
    ctx = torch.from_numpy(rng.standard_normal((2, seq, sgm["context_dim"]), np.float32)).to(dev, bf16)
    vec = rng.standard_normal((2, sgm["adm_in_channels"]), np.float32)
    text_embeds = torch.from_numpy(vec[:, :1280]).to(dev, bf16)  # pooled OpenCLIP-G part
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2, device=dev, dtype=bf16)
    x2 = torch.from_numpy(rng.standard_normal((2, 4, lat, lat), np.float32)).to(dev, bf16)
    t2 = torch.tensor([500.0, 500.0], device=dev)

    torch.manual_seed(0)
    model = tp.build_diffusers_unet(setup["peer"]).to(dev)
    out["params"] = tp.count_torch(model)
    model = model.to(bf16).eval()

    def unet(m, x, t, c, te, ti):
        return m(x, t, encoder_hidden_states=c, added_cond_kwargs={"text_embeds": te, "time_ids": ti},
                 return_dict=False)[0]

    with torch.inference_mode():
        unet(model, x2, t2, ctx, text_embeds, time_ids)
        sync()

        def fwd_once():
            unet(model, x2, t2, ctx, text_embeds, time_ids)
            sync()

        out["fwd_s"] = min(time_calls(fwd_once, 3) for _ in range(setup["rounds"]))

        # The same 30-step Euler loop as the JAX side: eps prediction, DiscreteDenoiser's
        # quantised timesteps, CFG with the batch doubled, sigmas from the seed's schedule.
        sigmas, train_sigmas = sdxl_sigmas(setup["steps"])
        train_sigmas_t = torch.from_numpy(train_sigmas).to(dev)
        scale = setup["cfg_scale"]
        noise = torch.from_numpy(rng.standard_normal((1, 4, lat, lat), np.float32)).to(dev)

        def sample():
            x = noise * float(np.sqrt(1.0 + sigmas[0] ** 2))
            for i in range(len(sigmas) - 1):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                idx = torch.argmin((train_sigmas_t - s).abs())  # on device, as the JAX side
                s_q = train_sigmas_t[idx]
                xin = torch.cat([x, x]) / (s_q * s_q + 1.0) ** 0.5
                eps = unet(model, xin.to(bf16), idx.float().expand(2), ctx, text_embeds, time_ids).float()
                den = torch.cat([x, x]) - s_q * eps
                den_u, den_c = den.chunk(2)
                den = den_u + scale * (den_c - den_u)
                x = x + (s_next - s) * (x - den) / s
            sync()
            return x

        sample()
        out["sample_s"] = min(time_calls(sample, 1) for _ in range(setup["rounds"]))

    # Train step: float32 params + AdamW, bf16 autocast, gradient checkpointing (as the seed's use_checkpoint).
    model = model.float().train()
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    target = torch.from_numpy(rng.standard_normal((1, 4, lat, lat), np.float32)).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=bf16):
            pred = unet(model, x2[:1], t2[:1], ctx[:1], text_embeds[:1], time_ids[:1])
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        opt.step()
        sync()

    try:
        step()
        out["train_s"] = min(time_calls(step, 2) for _ in range(setup["rounds"]))
    except Exception as e:  # e.g. torch.cuda.OutOfMemoryError
        out["train_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def gpu_part(which: str, tiny: bool) -> None:
    setup = sdxl_setup(tiny)
    out: dict = {"framework": which}
    try:
        (gpu_part_jax if which == "jax" else gpu_part_torch)(setup, out)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    print("RESULT " + json.dumps(out), flush=True)


def gpu_section(tiny: bool, timeout: int) -> None:
    print("\n== (c) GPU: SDXL base UNet, bf16 ==")
    if not tiny:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        platform = jax.devices()[0].platform
        if platform != "gpu" or not cuda:
            print(f"skipped: needs JAX on a GPU and torch.cuda (here jax platform={platform!r}, "
                  f"torch.cuda.is_available()={cuda}); run on a CUDA machine with jax[cuda] and a CUDA torch.")
            return
    else:
        print("--gpu-tiny: section (c)'s code at toy size on this device (numbers mean nothing)")
    setup = sdxl_setup(tiny)
    results = {}
    for which in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--gpu-part", which] + (["--gpu-tiny"] if tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[which] = json.loads(lines[-1][7:]) if lines else {"error": f"rc={proc.returncode}: "
                                                                            f"{proc.stderr[-800:]}"}
    j, t = results["jax"], results["torch"]
    for name, r in results.items():
        for key in ("error", "train_error", "attn_fallback"):
            if key in r:
                print(f"{name} {key}: {r[key]}")
    kind = j.get("device", "?")
    peak = peak_tflops(kind)
    print(f"device: {kind} / {t.get('device', '?')}; bf16 dense peak: {peak or 'unknown'} TFLOP/s; "
          f"params JAX {j.get('params', 0):,} diffusers {t.get('params', 0):,}; "
          f"JAX attention: {j.get('attn_implementation')}")
    fwd_fl, train_fl = j.get("fwd_flops", float("nan")), j.get("train_flops", float("nan"))
    steps = setup["steps"]
    print(f"\n| measurement | JAX | PyTorch | ratio (PT/JAX) | JAX TFLOP/s | PT TFLOP/s | JAX % peak | PT % peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, key, flops, unit in [
        (f"UNet fwd, CFG batch 2, {setup['latent']}^2 latents", "fwd_s", fwd_fl, "s"),
        ("train step, batch 1 (fp32 master, bf16 compute, remat)", "train_s", train_fl, "s"),
        (f"{steps}-step Euler + CFG, s/image", "sample_s", fwd_fl * steps, "s/image"),
    ]:
        js, ts = j.get(key), t.get(key)
        cells = [f"{js:.3f} {unit}" if js else "n/a", f"{ts:.3f} {unit}" if ts else "n/a",
                 f"{ts / js:.2f}" if js and ts else "n/a"]
        for s in (js, ts):
            cells.append(f"{flops / s / 1e12:.1f}" if s and flops == flops else "n/a")
        for s in (js, ts):
            cells.append(f"{100 * flops / s / 1e12 / peak:.0f}%" if s and peak and flops == flops else "n/a")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"TFLOP/s for both columns use XLA's FLOP count of the JAX computation (sampling: {steps} x the CFG fwd).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-tiny", action="store_true", help="run at toy size on any device")
    p.add_argument("--gpu-timeout", type=int, default=1800)
    p.add_argument("--gpu-part", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gpu_part:
        gpu_part(args.gpu_part, args.gpu_tiny)
        return
    gpu_section(args.gpu_tiny, args.gpu_timeout)


if __name__ == "__main__":
    main()
