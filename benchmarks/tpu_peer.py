"""Peer column of the TPU compile check (issue 26): our SDXL base UNet against diffusers 0.31's Flax one,
both compiled by XLA:TPU for the same compile-only chip, without TPUs.

    pip install --no-deps --target /tmp/peer_diffusers diffusers==0.31.0   # benchmark only, never a dependency
    python benchmarks/tpu_peer.py                         # full UNet forward, batch 2, 1024², ours then the peer
    python benchmarks/tpu_peer.py --part res640,st640     # one ResBlock / one transformer at SDXL widths (seconds)
    python benchmarks/tpu_peer.py --part st640 --attn tpu --label after   # ours with attn_implementation="tpu"
    python benchmarks/tpu_peer.py --part st640 --job train --fusions 15   # the 15 costliest fusions of each side
    python benchmarks/tpu_peer.py --table-only            # the table from the saved reports

Ours is sgm_jax.nn.unet.UNetModel built from configs/inference/sd_xl_base.py's network config; the peer is
diffusers' FlaxUNet2DConditionModel configured as SDXL base (its own parts for --part). Both compute in bfloat16
with float32 parameters (ours: `dtype`; diffusers: `dtype=jnp.bfloat16`, flax's default float32 param_dtype);
parameters are ShapeDtypeStructs (jax.eval_shape), never allocated, and their counts are checked equal.
Inputs are float32, as the engine hands them over. `--job train`: the gradient of a squared-output loss with
respect to the parameters (no optimiser), ours with the config's remat (use_checkpoint) unless --no-remat.

Figures are XLA:TPU's memory analysis (temp = activations, arguments) and cost analysis (bytes accessed,
FLOPs) of the compiled program; roofline seconds = max(FLOPs / bf16 peak, bytes / HBM bandwidth) with the
chip's published peaks (sgm_jax/aot/topology.py). --fusions N lists the N instructions of the optimised HLO
that move the most bytes (operands + result, from the shapes in compiled.as_text()) and their totals by kind
and by source module; --dump DIR writes each side's optimised HLO text. Reports are saved under
benchmarks/tpu_peer/<part>@<job>@<topology>.json. This is a benchmark, never a test: a full UNet compile takes
minutes to tens of minutes on a small CPU machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "tpu_peer"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- tpu_peer:begin -->", "<!-- tpu_peer:end -->"
PEER_PATH = os.environ.get("SGM_PEER_DIFFUSERS", "/tmp/peer_diffusers")
GiB = 2**30

sys.path.insert(0, str(REPO))

BATCH, LATENT, CTX_LEN, CTX_DIM, ADM = 2, 128, 77, 2048, 2816  # SDXL base at 1024², one CFG pair
# --part name -> (channels, spatial size): one ResBlock / one SpatialTransformer (depth 1) at an SDXL level
# part: (channels, latent size, transformer depth). st1280x10 is SDXL's 32x32 level (input_blocks.7: ten
# transformer blocks): where a remat policy acts between blocks (ours remats each block unless --no-remat).
PARTS = {"res640": (640, 64, 1), "res1280": (1280, 32, 1), "st640": (640, 64, 1), "st1280": (1280, 32, 1),
         "st1280x10": (1280, 32, 10)}


def _peer():
    if PEER_PATH not in sys.path:
        sys.path.insert(0, PEER_PATH)
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"diffusers is not importable from {PEER_PATH} ({err}): pip install --no-deps --target "
                         f"{PEER_PATH} diffusers==0.31.0 (or set SGM_PEER_DIFFUSERS)")
    import diffusers

    return diffusers


def sdxl_network_params(remat: bool = True) -> dict[str, Any]:
    import importlib

    from sgm_jax.diffusion.registry import to_plain

    config = importlib.import_module("configs.inference.sd_xl_base").get_config()
    params = dict(to_plain(config.model)["params"]["network_config"]["params"])
    if not remat:
        params["use_checkpoint"] = False
    return params


# Each builder returns (module, init inputs (small, for eval_shape), call(module, params, *inputs), inputs)
ATTN: str | None = None  # --attn: ours' attn_implementation ("tpu": the 'after' rows)
REMAT_POLICY: str | None = None  # --remat-policy: ours' remat_policy (nn.layers.REMAT_POLICIES)


def ours(part: str, dtype: Any, remat: bool) -> tuple[Any, tuple, Callable, tuple]:
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    if part == "unet":
        from sgm_jax.nn.unet import UNetModel

        model = UNetModel(**{**sdxl_network_params(remat), "attn_implementation": ATTN,
                             "remat_policy": REMAT_POLICY if remat else None}, dtype=dtype)
        ex = model.example_inputs(1, 8)
        small = (ex["x"], ex["timesteps"], ex["context"], ex["y"])
        inputs = (jax.ShapeDtypeStruct((BATCH, LATENT, LATENT, 4), f32), jax.ShapeDtypeStruct((BATCH,), f32),
                  jax.ShapeDtypeStruct((BATCH, CTX_LEN, CTX_DIM), f32), jax.ShapeDtypeStruct((BATCH, ADM), f32))
        call = lambda m, p, x, t, c, y: m.apply({"params": p}, x, t, context=c, y=y)  # noqa: E731
        return model, small, call, inputs
    ch, size, depth = PARTS[part]
    if part.startswith("res"):
        from sgm_jax.nn.unet import ResBlock

        model = ResBlock(channels=ch, out_channels=ch, dtype=dtype)
        small = (jnp.zeros((1, 8, 8, ch), dtype), jnp.zeros((1, 1280), f32))
        inputs = (jax.ShapeDtypeStruct((BATCH, size, size, ch), dtype), jax.ShapeDtypeStruct((BATCH, 1280), f32))
    else:
        from sgm_jax.nn.attention import SpatialTransformer

        blocks_remat = remat and depth > 1
        model = SpatialTransformer(ch, ch // 64, 64, depth=depth, context_dim=CTX_DIM, use_linear=True,
                                   attn_implementation=ATTN, use_checkpoint=blocks_remat,
                                   remat_policy=REMAT_POLICY if blocks_remat else None, dtype=dtype)
        small = (jnp.zeros((1, 8, 8, ch), dtype), jnp.zeros((1, 1, CTX_DIM), dtype))
        inputs = (jax.ShapeDtypeStruct((BATCH, size, size, ch), dtype),
                  jax.ShapeDtypeStruct((BATCH, CTX_LEN, CTX_DIM), dtype))
    call = lambda m, p, x, e: m.apply({"params": p}, x, e)  # noqa: E731
    return model, small, call, inputs


def peer(part: str, dtype: Any, remat: bool) -> tuple[Any, tuple, Callable, tuple]:
    import jax
    import jax.numpy as jnp

    _peer()
    f32 = jnp.float32
    if part == "unet":
        from diffusers.models.unets.unet_2d_condition_flax import FlaxUNet2DConditionModel

        # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        model = FlaxUNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=CTX_DIM, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=ADM, dtype=dtype)
        kw = lambda n: {"text_embeds": jnp.zeros((n, 1280), f32), "time_ids": jnp.zeros((n, 6), f32)}  # noqa: E731
        small = (jnp.zeros((1, 4, 8, 8), f32), jnp.zeros((1,), f32), jnp.zeros((1, 1, CTX_DIM), f32), kw(1))
        inputs = (jax.ShapeDtypeStruct((BATCH, 4, LATENT, LATENT), f32), jax.ShapeDtypeStruct((BATCH,), f32),
                  jax.ShapeDtypeStruct((BATCH, CTX_LEN, CTX_DIM), f32),
                  {"text_embeds": jax.ShapeDtypeStruct((BATCH, 1280), f32),
                   "time_ids": jax.ShapeDtypeStruct((BATCH, 6), f32)})
        call = lambda m, p, x, t, c, a: m.apply({"params": p}, x, t, c, a, return_dict=False)[0]  # noqa: E731
        return model, small, call, inputs
    ch, size, depth = PARTS[part]
    if part.startswith("res"):
        from diffusers.models.resnet_flax import FlaxResnetBlock2D

        model = FlaxResnetBlock2D(in_channels=ch, out_channels=ch, dtype=dtype)
        small = (jnp.zeros((1, 8, 8, ch), dtype), jnp.zeros((1, 1280), f32))
        inputs = (jax.ShapeDtypeStruct((BATCH, size, size, ch), dtype), jax.ShapeDtypeStruct((BATCH, 1280), f32))
    else:
        from diffusers.models.attention_flax import FlaxTransformer2DModel

        model = FlaxTransformer2DModel(in_channels=ch, n_heads=ch // 64, d_head=64, depth=depth,
                                       use_linear_projection=True, dtype=dtype)
        small = (jnp.zeros((1, 8, 8, ch), dtype), jnp.zeros((1, 1, CTX_DIM), dtype))
        inputs = (jax.ShapeDtypeStruct((BATCH, size, size, ch), dtype),
                  jax.ShapeDtypeStruct((BATCH, CTX_LEN, CTX_DIM), dtype))
    call = lambda m, p, x, e: m.apply({"params": p}, x, e)  # noqa: E731
    return model, small, call, inputs


SIDES = {"ours": ours, "peer": peer}


def count(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_params(side: str, part: str, dtype: Any, remat: bool) -> tuple[Any, Callable, tuple, Any]:
    import jax

    model, small, call, inputs = SIDES[side](part, dtype, remat)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *small))["params"]
    return model, call, inputs, params


# ---------------------------------------------------------------------------------------------------- HLO bytes
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_SIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


def _prod(dims: list[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def uncounted(rows: list[dict[str, Any]]) -> dict[str, float]:
    """XLA:TPU's cost analysis leaves out its own `online-softmax` custom calls (the softmax + PV matmul it
    substitutes for a bf16 attention, as in diffusers): their operand + result bytes and matmul FLOPs."""
    calls = [r for r in rows if r["op_name"] == "online-softmax" or r["op"].endswith("softmax")]
    return {"calls": len(calls), "bytes": sum(r["in_bytes"] + r["out_bytes"] for r in calls),
            "flops": sum(r["flops"] for r in calls)}


def _bytes(text: str) -> float:
    return sum(_SIZE[t] * (eval("*".join(d.split(",")) or "1") if d else 1) for t, d in _SHAPE.findall(text))


def hlo_costs(hlo: str) -> list[dict[str, Any]]:
    """Per instruction of the optimised HLO's non-fusion computations (entry, loop bodies, calls): the
    bytes of its result and of its operands, from the printed shapes (what XLA's cost analysis sums as
    'bytes accessed', before its own refinements), its kind and the op_name of its metadata."""
    rows, comp, fused, sizes, dims = [], None, False, {}, {}
    for line in hlo.splitlines():
        if line and not line[0].isspace() and "{" in line and ("->" in line or line.startswith("ENTRY")):
            name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            comp, sizes, dims = name.lstrip("%"), {}, {}
            fused = "fused" in comp or comp.startswith("wrapped") or "region" in comp or ".clone" in comp
            continue
        if comp is None or fused:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        sizes[name] = _bytes(shape)
        dims[name] = [int(d) for d in (_SHAPE.search(shape).group(2) if _SHAPE.search(shape) else "").split(",") if d]
        if op in _FREE:
            continue
        depth, i = 1, 0  # the operand list ends at the matching parenthesis
        while i < len(rest) and depth:
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        operands = re.findall(r"%([\w.\-]+)", rest[: i - 1])
        kind = re.search(r"kind=(\w+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        flops = 0.0
        if target and ("softmax" in target.group(1) or "online-softmax" in rest):  # [G,T,S] x [G,S,H] -> [G,T,H]
            g_t_h = dims[name]
            scores = max((dims.get(o, []) for o in operands), key=lambda d: _prod(d))
            flops = 2.0 * _prod(g_t_h) * (scores[-1] if scores else 0)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        in_bytes = sum(sizes.get(o, 0) for o in operands)
        if op.endswith("-done"):  # an async copy / slice: counted once, at its start, as read + write
            continue
        out_bytes = in_bytes if op.endswith("-start") else sizes[name]
        rows.append({"name": name, "op": op + (f":{kind.group(1)}" if kind else "")
                     + (f":{target.group(1)}" if target else ""), "computation": comp, "flops": flops,
                     "out_bytes": out_bytes, "in_bytes": in_bytes,
                     "shape": shape.split("{")[0], "op_name": op_name.group(1) if op_name else ""})
    return rows


def _source(op_name: str) -> str:
    """'jit(f)/jvp(...)/UNetModel/input_blocks_4/1/transformer_blocks_0/attn1/dot_general' -> the module path
    with the block indices folded: 'transformer_blocks/attn1/dot_general'."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(", "remat",
                                                                      "checkpoint", "pjit", "vmap("))]
    keep = [re.sub(r"_\d+$", "", p) for p in parts if not p.isdigit()]
    keep = [p for p in keep if p not in ("input_blocks", "output_blocks", "middle_block", "down_blocks",
                                         "up_blocks", "attentions", "resnets")]
    return "/".join(keep[-3:])


def fusion_summary(hlo: str, top: int) -> str:
    rows = hlo_costs(hlo)
    total = sum(r["in_bytes"] + r["out_bytes"] for r in rows)
    out = [f"  {len(rows)} instructions, {total / 1e9:.2f} GB by their shapes"]
    by_kind: dict[str, float] = collections.Counter()
    by_src: dict[str, float] = collections.Counter()
    for r in rows:
        by_kind[r["op"]] += r["in_bytes"] + r["out_bytes"]
        by_src[_source(r["op_name"])] += r["in_bytes"] + r["out_bytes"]
    out.append("  by kind: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in by_kind.most_common(8)))
    out.append("  by source (GB):")
    out += [f"    {v / 1e9:8.3f}  {k}" for k, v in by_src.most_common(top)]
    out.append(f"  top {top} instructions (GB in + out, result shape, source):")
    for r in sorted(rows, key=lambda r: -(r["in_bytes"] + r["out_bytes"]))[:top]:
        out.append(f"    {(r['in_bytes'] + r['out_bytes']) / 1e9:7.3f} ({r['in_bytes'] / 1e9:.3f} + "
                   f"{r['out_bytes'] / 1e9:.3f})  {r['op']:<16} {r['shape']:<28} {r['op_name'][-90:]}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- compile
def compile_side(side: str, part: str, job: str, topology: str, *, remat: bool = True, fusions: int = 0,
                 dump: str | None = None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from sgm_jax import parallel
    from sgm_jax.aot import build_report, chip_of, compile_only_devices

    devices = compile_only_devices(topology)[:1]
    chip = chip_of(topology)
    mesh = parallel.make_mesh(devices=devices)
    repl = parallel.replicated(mesh)
    model, call, inputs, params = abstract_params(side, part, jnp.bfloat16, remat)
    put = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)
    params, inputs = put(params), put(inputs)

    if job == "forward":
        fn = lambda p, *xs: call(model, p, *xs)  # noqa: E731
    else:
        def fn(p, *xs):
            loss = lambda q: jnp.mean(jnp.square(call(model, q, *xs).astype(jnp.float32)))  # noqa: E731
            return jax.grad(loss)(p)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(params, *inputs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    report = build_report(compiled, job=job, config=f"{side}:{part}", topology=topology, chip=chip,
                          devices=devices, mesh=mesh, images_per_step=BATCH,
                          groups={"parameters": params, "batch": inputs}, compile_seconds=t2 - t0)
    out = report.as_dict(chip)
    out.update(side=side, part=part, params=count(params), lower_seconds=t1 - t0, xla_seconds=t2 - t1,
               remat=remat if side == "ours" else False)
    hlo = compiled.as_text()
    rows = hlo_costs(hlo)
    out["hlo_shape_bytes"] = sum(r["in_bytes"] + r["out_bytes"] for r in rows)
    out["uncounted"] = uncounted(rows)
    if fusions or dump:
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            (Path(dump) / f"{side}_{part}_{job}.hlo.txt").write_text(hlo)
        if fusions:
            out["fusion_summary"] = fusion_summary(hlo, fusions)
    return out


def row_file(part: str, job: str, topology: str, side: str, label: str = "") -> Path:
    return OUT / f"{side}{'.' + label if label else ''}@{part}@{job}@{topology.replace(':', '_')}.json"


def _saved(part: str, job: str, topology: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, report) of every saved report of this row: ours under each label (before < current < after),
    then the peer."""
    found = []
    for path in OUT.glob(f"*@{part}@{job}@{topology.replace(':', '_')}.json"):
        side, _, label = path.name.split("@")[0].partition(".")
        found.append(((side != "ours", {"before": 0, "": 1, "after": 2}.get(label, 3), label),
                      (side if side == "ours" else "diffusers 0.31") + (f" ({label})" if label else ""),
                      json.loads(path.read_text())))
    return [(name, r) for _, name, r in sorted(found, key=lambda x: x[0])]


def table(rows: list[tuple[str, str, str]]) -> str:
    """Figures per compile; 'corr.' adds what XLA's cost analysis leaves out (its online-softmax custom calls,
    from their shapes) so both sides count the same work. Ratio rows: ours / peer, XLA's figures and corrected."""
    head = ("| part | job | side | params | temp GiB | args GiB | GB accessed (XLA) | GB corr. | TFLOP (XLA) | "
            "TFLOP corr. | roofline ms corr. (bound) | compile s |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for part, job, topo in rows:
        found = _saved(part, job, topo)
        fig: dict[str, dict[str, float]] = {}
        for name, x in found:
            u = x.get("uncounted", {"bytes": 0.0, "flops": 0.0, "calls": 0})
            gb, tf = x["bytes_accessed"] + u["bytes"], x["flops"] + u["flops"]
            chip = x["peak_flops"], x["hbm_bandwidth"]
            sec = max(tf / chip[0], gb / chip[1])
            fig[name] = {"temp": x["temp_bytes"], "gb": x["bytes_accessed"], "gbc": gb, "tf": x["flops"],
                         "tfc": tf, "sec": sec}
            out.append(f"| {part} | {job} | {name} | {x['params']:,} | {x['temp_bytes'] / GiB:.3f} | "
                       f"{x['argument_bytes'] / GiB:.3f} | {x['bytes_accessed'] / 1e9:.2f} | {gb / 1e9:.2f} | "
                       f"{x['flops'] / 1e12:.3f} | {tf / 1e12:.3f} | {sec * 1e3:.2f} "
                       f"({'compute' if tf / chip[0] >= gb / chip[1] else 'memory'}) | {x['compile_seconds']:.0f} |")
        peer_fig = fig.get("diffusers 0.31")
        for name, f in fig.items():
            if not name.startswith("ours") or peer_fig is None:
                continue
            r = {k: (f[k] / peer_fig[k] if peer_fig[k] else float("nan")) for k in f}
            out.append(f"| {part} | {job} | **{name} / peer** | | **{r['temp']:.2f}** | | **{r['gb']:.2f}** | "
                       f"**{r['gbc']:.2f}** | **{r['tf']:.2f}** | **{r['tfc']:.2f}** | {r['sec']:.2f} | |")
    return "\n".join(out)


def write_results(text: str) -> None:
    """Replace the block between BEGIN and END in RESULTS.md (left alone when the markers are absent)."""
    body = RESULTS.read_text() if RESULTS.is_file() else ""
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + f"{BEGIN}\n{text}\n{END}" + body[body.index(END) + len(END):]
        RESULTS.write_text(body)


TABLE_ROWS = [(part, job) for part in ("unet", "st640", "st1280", "res640", "st1280x10") for job in ("forward", "train")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="unet", help=f"comma-separated: unet, {', '.join(PARTS)}")
    p.add_argument("--job", default="forward", help="forward, train, or both (comma-separated)")
    p.add_argument("--side", default="ours,peer", help="ours, peer or both (comma-separated; one compile at a time)")
    p.add_argument("--topology", default="v5e:1x1")
    p.add_argument("--no-remat", action="store_true", help="ours without the config's use_checkpoint")
    p.add_argument("--fusions", type=int, default=0, help="print the N costliest HLO instructions of each compile")
    p.add_argument("--dump", help="write each compile's optimised HLO text into this folder")
    p.add_argument("--count-only", action="store_true", help="only compare the parameter counts (seconds)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--no-save", action="store_true", help="do not overwrite the saved reports (experiments)")
    p.add_argument("--label", default="", help="save ours under this label (e.g. before / after a change)")
    p.add_argument("--remat-policy", help="ours' remat_policy with remat (e.g. dots_with_no_batch_dims_saveable)")
    p.add_argument("--attn", help='ours\' attn_implementation: "tpu" for the "after" rows (default: jax.nn\'s)')
    args = p.parse_args()
    global ATTN, REMAT_POLICY
    ATTN, REMAT_POLICY = args.attn, args.remat_policy
    parts, jobs, sides = args.part.split(","), args.job.split(","), args.side.split(",")
    if args.count_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax.numpy as jnp

        for part in parts:
            n = {s: count(abstract_params(s, part, jnp.bfloat16, True)[3]) for s in sides}
            print(f"{part}: " + ", ".join(f"{s} {v:,}" for s, v in n.items())
                  + ("" if len(set(n.values())) == 1 else "  DIFFERENT"))
        return
    rows = [(part, job, args.topology) for part in parts for job in jobs]
    if not args.table_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for part, job, topo in rows:
            for side in sides:
                print(f"{side} {part} {job} on {topo}: compiling ...", flush=True)
                r = compile_side(side, part, job, topo, remat=not args.no_remat, fusions=args.fusions,
                                 dump=args.dump)
                print(f"  {r['params']:,} params; temp {r['temp_bytes'] / GiB:.3f} GiB, args "
                      f"{r['argument_bytes'] / GiB:.3f} GiB, {r['bytes_accessed'] / 1e9:.2f} GB accessed"
                      + (f" (shapes: {r['hlo_shape_bytes'] / 1e9:.2f})" if "hlo_shape_bytes" in r else "")
                      + f", {r['flops'] / 1e12:.3f} TFLOP; compiled in {r['compile_seconds']:.0f} s", flush=True)
                if "fusion_summary" in r:
                    print(r.pop("fusion_summary"), flush=True)
                if not args.no_save:
                    label = args.label if side == "ours" else ""
                    row_file(part, job, topo, side, label).write_text(json.dumps(r, indent=1))
    if not args.no_save:
        full = [(part, job, args.topology) for part, job in TABLE_ROWS if _saved(part, job, args.topology)]
        write_results(table(full))
    print(table(rows))


if __name__ == "__main__":
    main()
