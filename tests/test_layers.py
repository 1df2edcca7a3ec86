"""The package's imports run downward through the layers of ../shared/DESIGN.md, and no modules import
each other in a circle. Read from the source (ast), deferred imports included: nothing is imported.

Layers, bottom to top (a module may import its own package and any lower layer):
    errors, the CPU flags, the batch keys of stored outputs
    config files, image files, host helpers, the denoiser framework (diffusion/)
    parallel (meshes, shardings), networks (nn/)
    engine.py
    convert/ (seed layouts)
    lora/ (adapter maths and key layouts: what loading a LoRA needs)
    model specs + checkpointing (optim.py, model_inputs.py, sampling_defaults.py; checkpointing/: weights of
        workdirs, frozen parts, LoRA)
    data/
    autoencoding/
    evaluation/
    training/   inference/
    aot/ (compile checks over both)
    cli/, configs/
    entry points (python -m sgm_jax.train / compile_check, the repo's scripts)
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "sgm_jax"
LAYERS = [
    {"errors", "xla_cpu", "batch_keys", "signals"},
    {"config_files", "images", "multihost", "diffusion", "mesh_context"},
    {"parallel", "nn"},
    {"engine"},
    {"convert"},
    {"lora"},
    {"optim", "checkpointing", "model_inputs", "sampling_defaults"},
    {"data"},
    {"autoencoding"},
    {"evaluation"},
    {"training", "inference"},
    {"aot"},
    {"cli", "configs"},
    {"train", "compile_check", "<script>"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
SCRIPTS = ["train.py", "sample.py", "convert_torch_weights.py", "demo.py", "evaluate.py", "prepare_data.py"]


def sources() -> dict[str, Path]:
    """{module name: file} for the package (configs/ through its real folder) and the scripts."""
    found = {}
    for root, prefix in ((PACKAGE, "sgm_jax"), (REPO / "configs", "sgm_jax.configs")):
        for f in sorted(root.rglob("*.py")):
            if "configs" in f.relative_to(root).parts[:1] and root == PACKAGE:
                continue  # the symlink to ../configs, read above
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = f
    for script in SCRIPTS:
        if (REPO / script).is_file():
            found[f"<script>.{Path(script).stem}"] = REPO / script
    return found


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported sgm_jax module, line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from sgm_jax import multihost` imports the submodule
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out += [(name, node.lineno) for name in names if name.split(".")[0] == "sgm_jax"]
    return out


def unit(module: str) -> str:
    parts = module.split(".")
    return "<script>" if parts[0] == "<script>" else (parts[1] if len(parts) > 1 else "sgm_jax")


@functools.cache
def graph() -> dict[str, list[tuple[str, int]]]:
    files = sources()
    known = set(files)
    return {m: [(t, line) for t, line in imports(m, f, known) if t in known] for m, f in files.items()}


def test_every_package_unit_has_a_layer():
    units = {unit(m) for m in sources()} - {"sgm_jax"}
    assert units <= set(RANK), f"no layer for {sorted(units - set(RANK))}: add it to LAYERS"


def test_imports_run_only_downward():
    upward = []
    for source, targets in graph().items():
        if source == "sgm_jax":
            continue  # the package's own __init__ (it applies the CPU flags)
        for target, line in targets:
            a, b = unit(source), unit(target)
            if b != "sgm_jax" and a != b and RANK[b] >= RANK[a]:
                upward.append(f"{source}:{line} imports {target} ({a} is not above {b})")
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    edges = {m: {t for t, _ in ts if t != m} for m, ts in graph().items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package and its own modules are one unit (its __init__ re-exports them)
            if len({m for m in component if not any(o.startswith(m + ".") for o in component)}) > 1:
                cycles.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles
