"""sgm-compile (python -m sgm_jax.compile_check): a micro SDXL fine-tune and a micro SDXL sampling job
compile for a 1-host (v5e:2x2) and a 2-host (v5p:2x2x2) TPU slice through the real command line,
without a TPU (libtpu's compile-only devices). Skipped, with the reason, where libtpu is not installed.

The micro configs (tests/compile_configs/) keep SDXL's structure (two text towers, size embedders,
adm, attention, the f=8 VAE) at tiny widths: XLA:TPU compiles a training step of it in about a
minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgm_jax.aot import topology

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "compile_configs"
GiB = 2**30

needs_libtpu = pytest.mark.skipif(not topology.libtpu_available(),
                                  reason="libtpu is not installed (pip install libtpu): no TPU compiler here")


def compile_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    return subprocess.run([sys.executable, "-m", "sgm_jax.compile_check", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)


def report_of(*args: str) -> dict:
    proc = compile_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# one full compile per job (each is about a minute of CI's 2 cores): training on the 2-host slice, where
# FSDP spans hosts; sampling on a 1-host slice (sample.py runs each host on its own chips)
@pytest.fixture(scope="module", params=["v5p:2x2x2"])
def train_report(request) -> dict:
    return report_of("--config", str(CONFIGS / "micro_sdxl_finetune.py"), "--topology", request.param)


@pytest.fixture(scope="module", params=["v5e:2x2"])
def sample_report(request) -> dict:
    return report_of("--config", str(CONFIGS / "micro_sdxl.py"), "--topology", request.param, "--job", "sample",
                     "--steps", "4", "--num", "8")


@needs_libtpu
def test_finetune_step_compiles_with_fsdp_splitting_the_largest_parameters(train_report):
    r = train_report
    chips = {"v5e:2x2": 4, "v5p:2x2x2": 8}[r["topology"]]
    assert (r["chips"], r["hosts"]) == (chips, 1 if chips == 4 else 2)
    assert r["mesh"] == {"data": 1, "fsdp": chips}  # sdxl_finetune: FSDP over every chip
    assert r["job"] == "train" and r["compiled"] and r["fits"]
    groups = r["groups"]
    assert {"parameters", "optimizer state", "frozen parameters", "batch"} <= set(groups)
    for key in ("argument_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "flops", "bytes_accessed"):
        assert r[key] > 0, key
    assert r["hbm_bytes"] == {"v5e:2x2": 16, "v5p:2x2x2": 95}[r["topology"]] * GiB
    # the compiler's argument bytes are the shardings' sum (parameters, AdamW moments, frozen parts, batch)
    # plus TPU tile padding, which is large only for micro widths (32 channels fill a 128-lane tile)
    assert sum(groups.values()) <= r["argument_bytes"] <= 2 * sum(groups.values())
    largest = r["largest_param"]
    assert "fsdp" in largest["spec"] and largest["bytes_per_chip"] * chips == largest["bytes"]
    # small arrays stay replicated (parallel.MIN_FSDP_SIZE): per chip a bit over 1/N of the whole
    total = r["groups_global"]["parameters"]
    assert total / chips <= groups["parameters"] < 0.6 * total
    assert groups["optimizer state"] < 0.6 * r["groups_global"]["optimizer state"]
    assert r["bound"] in ("compute", "memory") and 0 < r["mfu"] <= 1
    assert r["step_seconds"] == pytest.approx(max(r["flops"] / r["peak_flops"], r["bytes_accessed"] / r["hbm_bandwidth"]))
    assert r["images_per_second"] == pytest.approx(8 / r["step_seconds"])


@needs_libtpu
def test_sampling_call_compiles_on_one_hosts_chips(sample_report):
    r = sample_report
    local = {"v5e:2x2": 4, "v5p:2x2x2": 4}[r["topology"]]  # sample.py: each host on its own chips
    assert r["chips"] == local and r["hosts"] == 1 and r["mesh"] == {"data": local, "fsdp": 1}
    assert r["job"] == "sample" and r["fits"] and r["images_per_step"] == 8
    assert {"parameters", "first stage", "batch"} <= set(r["groups"])
    assert r["groups"]["parameters"] == r["groups_global"]["parameters"]  # replicated for sampling
    assert r["temp_bytes"] > 0 and r["flops"] > 0 and r["step_seconds"] > 0
    assert any("4 denoiser calls" in n for n in r["notes"])


@needs_libtpu
def test_too_big_for_the_chip_exits_1_naming_the_shortfall():
    proc = compile_cli("--config", str(CONFIGS / "micro_sdxl_finetune.py"), "--topology", "v5e:2x2",
                       "--config.model.params.network_config.params.model_channels=4096")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit v5e:2x2" in error[0] and "GiB short" in error[0], proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout


@needs_libtpu
def test_activations_too_big_for_the_chip_exit_1_with_the_compilers_figure():
    # the arguments fit (0.2 GiB per chip); 16 images of 1024² per v5e chip need more than its HBM for
    # activations, which XLA:TPU's compile refuses: a report and the shortfall, not a traceback
    proc = compile_cli("--config", str(CONFIGS / "micro_sdxl_finetune.py"), "--topology", "v5e:2x2",
                       "--width", "1024", "--height", "1024", "--config.data.params.train.loader.batch_size=64",
                       "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["fits"] and not report["compiled"] and "CompileTimeHbmOom" in report["compiler_error"]
    assert report["argument_bytes"] < 0.5 * GiB and 16 * GiB < report["temp_bytes"] < 64 * GiB
    assert report["usable_bytes"] == 15.75 * GiB  # v5e's 16 GiB less the runtime's share, as XLA:TPU says
    assert report["shortfall_bytes"] == report["total_bytes"] - report["usable_bytes"] > 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit v5e:2x2" in error[0] and "XLA:TPU's figure" in error[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_without_libtpu_one_line_says_pip_install_libtpu(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(topology.UserError, match="pip install libtpu"):
        topology.compile_only_devices("v5e:2x2")


def test_unknown_generation_is_one_line():
    with pytest.raises(topology.UserError, match="v5p:2x2x2"):
        topology.chip_of("v7x")


def test_a_cpu_user_never_meets_the_tpu_runtime():
    """Importing the compile check (as every CLI module's parser does) loads no libtpu, and on a
    machine without TPU chips the first backend start is CPU's alone: with libtpu installed, no
    TPU start (seconds, and libtpu's error lines on stderr)."""
    code = ("import sgm_jax.aot, sgm_jax.cli.compile_check, sys; import jax; "
            "print('libtpu' in sys.modules, jax.devices()[0].platform)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "cpu"]
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr[-2000:]


def test_stand_in_data_has_the_configs_shapes_and_keys():
    from sgm_jax.aot.stand_in import stand_in_data
    from sgm_jax.cli.configs import load_config

    data = stand_in_data(load_config("sdxl_finetune"))  # 1024 px aspect buckets: the largest is 1024x1024
    assert data["target"] == "synthetic"
    assert data["params"] == {"batch_size": 32, "image_shape": [1024, 1024, 3], "keys": [
        "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]}
    assert stand_in_data(load_config("txt2img_clipl"))["params"]["image_shape"] == [256, 256, 3]  # Resize 256
    assert stand_in_data(load_config("imagenet_f8_cond"))["params"]["keys"][0] == "cls"
    assert stand_in_data(load_config("sdxl_finetune"), (512, 768))["params"]["image_shape"] == [512, 768, 3]


def test_roofline_takes_the_longer_bound():
    from sgm_jax.aot.report import Report

    chip = topology.CHIPS["v5e"]
    r = Report(job="train", config="c", topology="v5e:1x1", chip="v5e", chips=1, hosts=1, mesh={"data": 1, "fsdp": 1},
               images_per_step=4, groups={}, groups_global={}, largest_param={}, argument_bytes=10 * GiB,
               output_bytes=GiB, alias_bytes=GiB, temp_bytes=7 * GiB, code_bytes=0, hbm_bytes=chip.hbm_bytes,
               flops=197e12, bytes_accessed=0.819e12 * 2, transcendentals=0, compile_seconds=1.0)
    roof = r.roofline(chip)
    assert roof["bound"] == "memory" and roof["step_seconds"] == pytest.approx(2.0)
    assert roof["mfu"] == pytest.approx(0.5) and roof["images_per_second"] == pytest.approx(2.0)
    assert r.total_bytes == 17 * GiB and not r.fits and "1.00 GiB short" in r.shortfall()


def test_the_compilers_out_of_hbm_message_becomes_the_reports_sizes():
    import jax
    import numpy as np

    from sgm_jax.aot.report import build_report, out_of_memory

    groups = {"parameters": jax.ShapeDtypeStruct((GiB // 4,), np.float32)}  # 1 GiB of arguments
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
               "for HLO temporaries (16.50G) exceeds available HBM (15.75G). HLO module: jit_step.\nSee https://...")
    stand_in = out_of_memory(groups, RuntimeError(message))
    assert out_of_memory(groups, RuntimeError("INVALID_ARGUMENT: a bad sharding")) is None
    r = build_report(stand_in, job="train", config="c", topology="v5e:1x1", chip=topology.CHIPS["v5e"],
                     devices=jax.devices()[:1], mesh=jax.make_mesh((1,), ("data",)), images_per_step=4,
                     groups=groups, compile_seconds=3.0)
    assert (r.argument_bytes, r.temp_bytes, r.usable_bytes) == (GiB, 15.5 * GiB, 15.75 * GiB)
    assert not r.compiled and not r.fits and r.flops == 0 and r.shortfall_bytes == 0.75 * GiB
    assert "0.75 GiB short" in r.shortfall() and "16.50 GiB per chip" in r.shortfall()
    assert r.compiler_error.startswith("RESOURCE_EXHAUSTED") and "\n" not in r.compiler_error
    # the later form, from the memory-space assignment of a large program (its "Used" is the whole program's)
    late = out_of_memory(groups, RuntimeError(
        "See https://openxla.org/xla/errors/error_1000 for more details. [type.googleapis.com/tensorflow.tpu."
        "CompilationResultProto='\\x08Ran out of memory in memory space hbm. Used 31.28G of 31.24G hbm. Exceeded "
        "hbm capacity by 41.04M.\\n\\nTotal hbm usage >= 31.5...']"))
    assert (late.temp_size_in_bytes, late.usable_bytes) == (int(30.28 * GiB), int(31.24 * GiB))
    assert late.error == "Ran out of memory in memory space hbm. Used 31.28G of 31.24G hbm. Exceeded hbm capacity by 41.04M."


def test_the_splash_kernels_work_is_counted_from_their_shapes():
    """XLA's cost analysis does not see inside a Pallas kernel: aot.kernels counts the splash kernels of a
    traced step from their shapes (forward 2, dK/dV 4, dQ 3 matmuls of 2*T*S*d FLOPs per row and head; K/V
    or Q/dO re-read once per further block of 512), a loop multiplying, the interpret-mode twin not counted."""
    import jax
    import jax.numpy as jnp

    from sgm_jax.aot.kernels import kernel_cost
    from sgm_jax.nn.attention import attention

    b, t, s, n, d = 2, 1024, 512, 2, 64
    q, kv = jnp.zeros((b, t, n, d), jnp.bfloat16), jnp.zeros((b, s, n, d), jnp.bfloat16)
    loss = lambda q, k, v: (attention(q, k, v, "splash").astype(jnp.float32) ** 2).sum()  # noqa: E731
    cost = kernel_cost(jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv).jaxpr.jaxpr)
    unit = 2.0 * b * n * t * s * d
    assert cost["calls"] == 3 and cost["flops"] == (2 + 4 + 3) * unit, cost
    q_bytes, kv_bytes = b * n * t * d * 2, b * n * s * d * 2  # bf16
    # each kernel reads its operands and writes its outputs once; fwd / dq read K and V again for the 2nd
    # block of 512 queries; dkv's single key block reads Q and dO once
    assert cost["bytes_accessed"] > 2 * 2 * kv_bytes + 3 * (q_bytes + 2 * kv_bytes), cost
    looped = kernel_cost(jax.make_jaxpr(lambda q, k, v: jax.lax.map(lambda x: attention(x, k, v, "splash"), q))(
        q[None].repeat(3, 0), kv, kv).jaxpr)
    assert looped["calls"] == 3 and looped["flops"] == 3 * 2 * unit, looped  # calls: executions per step


@needs_libtpu
def test_an_autoencoder_with_lpips_builds_without_the_lpips_files(tmp_path):
    """The LPIPS loss reads converted VGG16 files that a compile-only machine does not have: the compile
    check builds the task on random weights of their shapes (args-only here: the step's arguments)."""
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "SGM_JAX_LPIPS": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "sgm_jax.compile_check", "--config", "autoencoder_mnist",
                           "--topology", "v5e:2x2", "--args-only", "--json",
                           "--config.model.params.loss_config.params.perceptual_weight=0.25"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"parameters", "optimizer state", "discriminator", "EMA parameters"} <= set(r["groups"]) and r["fits"]


ATTENTION_ON_TPU = """
import json, jax, jax.numpy as jnp
from sgm_jax import mesh_context, parallel
from sgm_jax.aot import topology
from sgm_jax.nn.attention import attention
topology.use_cpu_host()
mesh = parallel.make_mesh(1, -1, devices=topology.compile_only_devices("v5e:2x2"))
out = {}
for batch, impl in ((8, None), (8, "xla"), (2, None)):
    x = jax.ShapeDtypeStruct((batch, 4096, 10, 64), jnp.bfloat16, sharding=parallel.batch_sharding(mesh)
                             if batch % mesh.size == 0 else parallel.replicated(mesh))
    loss = lambda q, k, v: (attention(q, k, v, impl).astype(jnp.float32) ** 2).sum()
    for job, fn in (("forward", lambda q, k, v: attention(q, k, v, impl)), ("train", jax.grad(loss, (0, 1, 2)))):
        compiled = jax.jit(mesh_context.traced_on(mesh, fn)).lower(x, x, x).compile()
        out[f"{impl}/b{batch}/{job}"] = [compiled.memory_analysis().temp_size_in_bytes,
                                         compiled.as_text().count("tpu_custom_call")]
print(json.dumps(out))
"""


@needs_libtpu
def test_tpu_programs_run_self_attention_through_the_splash_kernel_per_chip():
    """SDXL's 64x64-level self-attention ([8, 4096, 10 heads, 64]) compiled for a v5e:2x2 mesh (FSDP over 4
    chips, 2 rows each): by default the Pallas splash kernel, once per chip's rows (custom calls; logits never
    in HBM); "xla" jax.nn's materialised logits. A batch of 2 does not divide over the 4 chips: no kernel."""
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", ATTENTION_ON_TPU], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for job in ("forward", "train"):
        (temp, kernels), (temp_xla, kernels_xla) = r[f"None/b8/{job}"], r[f"xla/b8/{job}"]
        assert kernels >= 1 and kernels_xla == 0 and r[f"None/b2/{job}"][1] == 0, r
        assert temp < 0.05 * temp_xla and temp_xla > 2**30, r  # [2, 10, 4096, 4096] logits per chip: 1.25 GiB and up


COLLECTIVE_MATMUL = """
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from sgm_jax import parallel
from sgm_jax.aot import topology
from sgm_jax.aot.report import build_report, unpartitioned_flops
topology.use_cpu_host()
devices = topology.compile_only_devices("v5p:2x2x2")
mesh = parallel.make_mesh(1, -1, devices=devices)
w = jax.ShapeDtypeStruct((1280, 1280), jnp.bfloat16, sharding=NamedSharding(mesh, parallel.fsdp_spec((1280, 1280), 8)))
x = jax.ShapeDtypeStruct((32, 1024, 1280), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))
out = {"cpu_options": parallel.compiler_options({"collective_matmul": False}, parallel.make_mesh(1, 1, jax.devices("cpu")[:1]))}
for on in (True, False):
    options = parallel.compiler_options({"collective_matmul": on}, mesh)
    lowered = jax.jit(lambda w, x: x @ w, compiler_options=options).lower(w, x)
    compiled = lowered.compile()
    program = unpartitioned_flops(lowered, len(devices))
    report = build_report(compiled, job="train", config="matmul", topology="v5p:2x2x2", chip=topology.chip_of("v5p:2x2x2"),
                          devices=devices, mesh=mesh, images_per_step=32, groups={"parameters": w, "batch": x},
                          compile_seconds=0.0, program_flops=program)
    out[str(on)] = {"options": options, "loops": compiled.as_text().count("windowed_dot_general_body"),
                    "program": program, "flops": report.flops, "compiled": report.compiled_flops,
                    "noted": any("collective matmul" in n for n in report.notes)}
# one chip, no fsdp axis: no loops to undercount, so a larger unpartitioned count is XLA's rewrites and is not taken
one = parallel.make_mesh(1, 1, devices=devices[:1])
w1, x1 = (jax.ShapeDtypeStruct(a.shape[-2:] if a is w else (4, 1024, 1280), jnp.bfloat16,
                               sharding=NamedSharding(one, P())) for a in (w, x))
report = build_report(jax.jit(lambda w, x: x @ w).lower(w1, x1).compile(), job="train", config="matmul",
                      topology="v5p:2x2x2", chip=topology.chip_of("v5p:2x2x2"), devices=devices[:1], mesh=one,
                      images_per_step=4, groups={"parameters": w1, "batch": x1}, compile_seconds=0.0,
                      program_flops=2 * 4 * 1024 * 1280 * 1280 * 2)
out["one_chip"] = {"flops": report.flops, "compiled": report.compiled_flops}
print(json.dumps(out))
"""


@needs_libtpu
def test_collective_matmul_loops_are_counted_and_can_be_turned_off():
    """A matmul over an FSDP-split weight ([32, 1024, 1280] @ [1280, 1280], 8 chips of v5p:2x2x2): XLA:TPU makes
    it a loop of partial matmuls (collective matmul), whose body its cost analysis counts once; the report takes
    the unpartitioned program's FLOPs there (4 x 1024 x 1280 x 1280 x 2 per chip) and says so.
    `mesh.collective_matmul: False` gives the plain all-gather, counted whole; no options off TPU. On one chip
    (no fsdp axis) the compiled count stands, even beside a larger unpartitioned one."""
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", COLLECTIVE_MATMUL], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    exact = 4 * 1024 * 1280 * 1280 * 2
    assert r["cpu_options"] is None
    looped, plain = r["True"], r["False"]
    assert looped["options"] is None and plain["options"] == {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1000000}
    assert looped["loops"] >= 1 and plain["loops"] == 0, r
    assert looped["program"] == plain["program"] == exact, r
    assert looped["compiled"] < 0.9 * exact and looped["flops"] == exact and looped["noted"], r  # the loop's body once
    assert plain["flops"] == pytest.approx(exact, rel=0.03) and plain["compiled"] == 0 and not plain["noted"], r
    assert r["one_chip"]["flops"] == pytest.approx(exact, rel=0.03) and r["one_chip"]["compiled"] == 0, r
