"""UNet speed, sgm_jax (jit, NHWC) against diffusers' UNet2DConditionModel (PyTorch), same device.

    python benchmarks/unet_speed.py                     # (a) mnist_cond + (b) mid, fwd and train step
    python benchmarks/unet_speed.py --configs mid --rounds 7
    python benchmarks/unet_speed.py --gpu-tiny          # run section (c)'s code on CPU at toy size
    # without the XLA:CPU flag that `import sgm_jax` sets (see RESULTS.md and sgm_jax/xla_cpu.py):
    SGM_JAX_XLA_CPU_DEFAULTS=0 python benchmarks/unet_speed.py

(a) configs/mnist_cond.py's UNet (28x28x1, 2.6 M params), (b) an SD-like mid UNet
(128x[1,2,4], attention at 2 levels, linear proj, context 768x77, 32x32x4 latents, 101 M params).
Modes: `fwd` (inference forward), `train` (forward + MSE loss + backward + AdamW update, the
optimiser state kept on the device; torch: zero_grad/backward/AdamW.step, default AdamW impl).
Both networks have exactly the same parameter count (printed). Timing: per (config, mode), both
frameworks warm up, then `--rounds` interleaved rounds (JAX `--iters` calls, then torch
`--iters` calls); the best round's mean per call is reported. Ratio = torch / JAX (> 1: JAX faster).
Each round waits (up to `--quiet-wait` s) until other processes use < 0.25 cores and records
their CPU use: on a shared machine torch's OpenMP slows down many-fold under contention.
GFLOP/s uses the FLOPs of XLA's cost analysis of the same computation for both columns.

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Before jax is imported: on a GPU, JAX must not grab 75% of the memory that torch also needs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# --xla-flags must reach XLA_FLAGS before the backend starts, so it is read here, not in main().
for _i, _a in enumerate(sys.argv):
    if _a.startswith("--xla-flags"):
        _v = _a.split("=", 1)[1] if "=" in _a else sys.argv[_i + 1]
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _v).strip()

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import torch_peer as tp  # noqa: E402
from sgm_jax.nn.unet import UNetModel  # noqa: E402

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


def flops_of(compiled) -> float:
    """FLOPs from XLA's cost analysis of a compiled executable (dict, or a list of dicts in old jax)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------------
# (a) / (b): the two small configs
# --------------------------------------------------------------------------------------------

def make_inputs(sgm: dict, batch: int, size: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, size, size, sgm["in_channels"]), np.float32),
           "t": rng.uniform(0, 999, (batch,)).astype(np.float32),
           "target": rng.standard_normal((batch, size, size, sgm["out_channels"]), np.float32)}
    if sgm.get("context_dim") is not None:
        out["context"] = rng.standard_normal((batch, seq, sgm["context_dim"]), np.float32)
    if sgm.get("num_classes") == "sequential":
        out["y"] = rng.standard_normal((batch, sgm["adm_in_channels"]), np.float32)
    return out


class JaxBench:
    """Jitted fwd and train step (MSE + AdamW, state donated) of the sgm_jax UNet."""

    def __init__(self, sgm: dict, inputs: dict, device, lr: float = 1e-4):
        self.model = UNetModel(**sgm)
        put = lambda a: jax.device_put(jnp.asarray(a), device)
        self.x, self.t, self.target = put(inputs["x"]), put(inputs["t"]), put(inputs["target"])
        self.context = put(inputs["context"]) if "context" in inputs else None
        self.y = put(inputs["y"]) if "y" in inputs else None
        with jax.default_device(device):
            self.params = jax.jit(self.model.init)(jax.random.key(0), self.x[:1], self.t[:1],
                                                   None if self.context is None else self.context[:1],
                                                   None if self.y is None else self.y[:1])["params"]
        self.tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
        self.opt_state = jax.jit(self.tx.init)(self.params)
        model, tx = self.model, self.tx

        def fwd(params, x, t, context, y):
            return model.apply({"params": params}, x, t, context=context, y=y)

        def step(params, opt_state, x, t, context, y, target):
            def loss_fn(p):
                return jnp.mean(jnp.square(fwd(p, x, t, context, y) - target))

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.fwd = jax.jit(fwd)
        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.args = (self.x, self.t, self.context, self.y)

    def n_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(self.params))

    def flops(self, mode: str) -> float:
        if mode == "fwd":
            return flops_of(self.fwd.lower(self.params, *self.args).compile())
        return flops_of(self.step.lower(self.params, self.opt_state, *self.args, self.target).compile())

    def run(self, mode: str) -> None:
        if mode == "fwd":
            jax.block_until_ready(self.fwd(self.params, *self.args))
        else:
            self.params, self.opt_state, loss = self.step(self.params, self.opt_state, *self.args, self.target)
            jax.block_until_ready(loss)


class TorchBench:
    """diffusers UNet2DConditionModel, NCHW (or channels_last), eager; AdamW (torch defaults)."""

    def __init__(self, peer: dict, inputs: dict, device: str, channels_last: bool = False, lr: float = 1e-4):
        import torch

        self.torch = torch
        torch.manual_seed(0)
        self.device = device
        self.model = tp.build_diffusers_unet(peer).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.x = to(inputs["x"].transpose(0, 3, 1, 2)).contiguous(memory_format=fmt)
        self.target = to(inputs["target"].transpose(0, 3, 1, 2)).contiguous(memory_format=fmt)
        self.t = to(inputs["t"])
        self.context = to(inputs["context"]) if "context" in inputs else None
        self.y = to(inputs["y"]) if "y" in inputs else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def n_params(self) -> int:
        return tp.count_torch(self.model)

    def _fwd(self):
        return self.model(self.x, self.t, encoder_hidden_states=self.context, class_labels=self.y,
                          return_dict=False)[0]

    def run(self, mode: str) -> None:
        torch = self.torch
        if mode == "fwd":
            self.model.eval()
            with torch.inference_mode():
                self._fwd()
        else:
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(self._fwd(), self.target)
            loss.backward()
            self.opt.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def time_calls(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


class CpuMeter:
    """CPU used by *other* processes (in cores) over an interval: /proc/stat busy time minus ours.

    This machine is shared; torch's OpenMP barriers in particular slow down many-fold when
    another process holds a core, so rounds are started in quiet moments and each round
    records how busy the others were.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ok = os.path.exists("/proc/stat")
        self.start()

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4]  # minus idle and iowait

    def start(self) -> None:
        if self.ok:
            self.t, self.b, self.own = time.perf_counter(), self._busy(), sum(os.times()[:2])

    def others(self) -> float:
        if not self.ok:
            return float("nan")
        wall = time.perf_counter() - self.t
        return max(0.0, ((self._busy() - self.b) / self.hz - (sum(os.times()[:2]) - self.own)) / max(wall, 1e-6))


def wait_quiet(max_wait: float, threshold: float = 0.25, sample: float = 0.5) -> float:
    """Wait (at most max_wait s) until other processes use < threshold cores; returns their last use."""
    meter, deadline, used = CpuMeter(), time.perf_counter() + max_wait, float("nan")
    while True:
        meter.start()
        time.sleep(sample)
        used = meter.others()
        if not used > threshold or time.perf_counter() > deadline:
            return used


def interleaved(jb: JaxBench, tb: TorchBench, mode: str, rounds: int, iters: int, quiet_wait: float,
                warmup: int = 2):
    """Per round: wait for a quiet machine, JAX `iters` calls, pause, torch `iters` calls, pause.

    The pauses let the previous framework's spinning worker threads (Eigen / OpenMP) go idle
    before the other one starts. Returns [(JAX s/call, others' cores)], [(torch ...)].
    """
    for _ in range(warmup):  # compile (JAX) and first-touch allocations (both)
        jb.run(mode)
        tb.run(mode)
    jt, tt, meter = [], [], CpuMeter()
    for _ in range(rounds):
        wait_quiet(quiet_wait)
        for bench, out in ((jb, jt), (tb, tt)):
            meter.start()
            out.append((time_calls(lambda: bench.run(mode), iters), meter.others()))
            time.sleep(0.2)
    return jt, tt


def best_round(rounds: list[tuple[float, float]], quiet: float = 0.3) -> tuple[float, float, int]:
    """(fastest s/call among rounds where others used < `quiet` cores, or among all; their
    CPU use in that round; how many rounds were quiet)."""
    calm = [r for r in rounds if r[1] < quiet]
    t, others = min(calm or rounds)
    return t, others, len(calm)


SMALL_CONFIGS = {
    "mnist_cond": (tp.mnist_cond_configs, 28, 0),
    "mid": (tp.mid_configs, 32, 77),
}


def small_sections(args, rows: list[dict]) -> None:
    import torch

    jdev = jax.devices()[0]
    on_gpu = jdev.platform == "gpu" and torch.cuda.is_available()
    if not on_gpu:
        jdev = jax.devices("cpu")[0]
    tdev = "cuda" if on_gpu else "cpu"
    batches = {"mnist_cond": args.batch_mnist, "mid": args.batch_mid}
    for name in args.configs.split(","):
        cfg_fn, size, seq = SMALL_CONFIGS[name]
        sgm, peer = cfg_fn()
        batch = batches[name]
        inputs = make_inputs(sgm, batch, size, seq)
        jb = JaxBench(sgm, inputs, jdev)
        tb = TorchBench(peer, inputs, tdev, channels_last=args.torch_channels_last)
        nj, nt = jb.n_params(), tb.n_params()
        print(f"[{name}] params: JAX {nj:,}  diffusers {nt:,}  (difference {nt - nj:+,})", flush=True)
        for mode in args.modes.split(","):
            flops = jb.flops(mode)
            load0 = load_average()
            jt, tt = interleaved(jb, tb, mode, args.rounds, args.iters, args.quiet_wait)
            (j, jo, jq), (t, to, tq) = best_round(jt), best_round(tt)
            row = dict(config=name, mode=mode, batch=batch, jax_ms=1e3 * j, torch_ms=1e3 * t,
                       jax_med_ms=1e3 * statistics.median(r[0] for r in jt),
                       torch_med_ms=1e3 * statistics.median(r[0] for r in tt),
                       others=max(jo, to), quiet_rounds=min(jq, tq), rounds=len(jt),
                       gflop=flops / 1e9, load=f"{load0} -> {load_average()}", device=jdev.device_kind)
            row["ratio"] = row["torch_ms"] / row["jax_ms"]
            rows.append(row)
            print(f"[{name}] {mode:5s} b={batch}: JAX {row['jax_ms']:.1f} ms (median {row['jax_med_ms']:.1f}), "
                  f"torch {row['torch_ms']:.1f} ms (median {row['torch_med_ms']:.1f}), ratio {row['ratio']:.2f}, "
                  f"{row['gflop']:.1f} GFLOP/call; rounds (JAX s, others' cores): "
                  f"{[(round(a, 3), round(b, 2)) for a, b in jt]} / {[(round(a, 3), round(b, 2)) for a, b in tt]}; "
                  f"load {row['load']}", flush=True)
        del jb, tb
        gc.collect()


def print_small_table(rows: list[dict]) -> None:
    print(f"\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| config | mode | batch | JAX ms/iter | PyTorch ms/iter | ratio (PT/JAX) | GFLOP/iter | JAX GFLOP/s "
          "| PT GFLOP/s | quiet rounds | others' cores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mode = "fwd" if r["mode"] == "fwd" else "train step"
        print(f"| {r['config']} | {mode} | {r['batch']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f} "
              f"| {r['gflop']:.2f} | {r['gflop'] / r['jax_ms'] * 1e3:.1f} | {r['gflop'] / r['torch_ms'] * 1e3:.1f} "
              f"| {r['quiet_rounds']}/{r['rounds']} | {r['others']:.2f} |")


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


def gpu_section(args) -> None:
    print("\n== (c) GPU: SDXL base UNet, bf16 ==")
    if not args.gpu_tiny:
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
    setup = sdxl_setup(args.gpu_tiny)
    results = {}
    for which in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--gpu-part", which] + (["--gpu-tiny"] if args.gpu_tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.gpu_timeout)
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
    p.add_argument("--configs", default="mnist_cond,mid")
    p.add_argument("--modes", default="fwd,train")
    p.add_argument("--batch-mnist", type=int, default=64)
    p.add_argument("--batch-mid", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="calls per round per framework")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="per round, wait up to this many s for other processes to go below 0.25 cores")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax starts, e.g. "
                   "--xla-flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
    p.add_argument("--torch-channels-last", action="store_true", help="torch in channels_last memory format")
    p.add_argument("--skip-small", action="store_true", help="only section (c)")
    p.add_argument("--gpu-tiny", action="store_true", help="run section (c)'s code at toy size on any device")
    p.add_argument("--gpu-timeout", type=int, default=1800)
    p.add_argument("--gpu-part", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    if args.gpu_part:
        gpu_part(args.gpu_part, args.gpu_tiny)
        return
    import diffusers

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}, {jax.devices()[0].platform}), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}, "
          f"cpus {os.cpu_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {load_average()}", flush=True)
    rows: list[dict] = []
    if not args.skip_small:
        small_sections(args, rows)
        print_small_table(rows)
    gpu_section(args)


if __name__ == "__main__":
    main()
