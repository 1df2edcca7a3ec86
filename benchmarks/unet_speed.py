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

(c) GPU only: SDXL base in bf16 against diffusers, in benchmarks/sdxl_gpu_speed.py; this script runs
its section at the end (`--skip-small` runs only that, `--gpu-tiny` at toy size on any device).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
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
from timing import flops_of, time_calls  # noqa: E402
from sgm_jax.nn.unet import UNetModel  # noqa: E402

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
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    import diffusers

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}, {jax.devices()[0].platform}), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}, "
          f"cpus {os.cpu_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {load_average()}", flush=True)
    rows: list[dict] = []
    if not args.skip_small:
        small_sections(args, rows)
        print_small_table(rows)
    import sdxl_gpu_speed

    sdxl_gpu_speed.gpu_section(args.gpu_tiny, args.gpu_timeout)


if __name__ == "__main__":
    main()
