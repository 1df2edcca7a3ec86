"""Config files by name or path, and `--config.a.b=value` overrides (every command line and the library).

A config is an ml_collections file with `get_config()`. `--config` takes a path to such a
file, or the name of one shipped in the package `sgm_jax.configs` (`mnist_cond_cpu`,
`inference/sd_xl_base`, or the source-tree spelling `configs/inference/sd_xl_base.py`), so
the installed commands work from any directory. Overrides are parsed by the type of the
field they replace (bool, int, float, str, tuple); an unknown field or a value of the wrong
type is one error line naming the field (and the nearest existing name).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

from sgm_jax.errors import UserError

PACKAGE = "sgm_jax.configs"
OVERRIDE_PREFIX = "--config."


def packaged_configs_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations)))  # type: ignore[union-attr, arg-type]


def packaged_config_names() -> list[str]:
    """Names `--config` accepts without a path: mnist_cond, inference/sd_xl_base, ..."""
    root = packaged_configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.py")
                  if not p.name.startswith("_"))


def _packaged_module(spec: str) -> str | None:
    """'inference/sd_xl_base', 'configs/inference/sd_xl_base.py', 'mnist_cond' -> a module name, if shipped."""
    name = spec.replace("\\", "/").removesuffix(".py")
    name = name[len("configs/"):] if name.startswith("configs/") else name
    if name in packaged_config_names():
        return f"{PACKAGE}.{name.replace('/', '.')}"
    return None


def config_name(spec: str | os.PathLike) -> str:
    """Short name for outputs and metadata: the file's stem ('sd_xl_base')."""
    return Path(str(spec)).stem


def load_config(spec: str | os.PathLike) -> Any:
    """`get_config()` of a config file path, or of a config shipped in sgm_jax.configs by name.

    A path that exists wins; otherwise the name is looked up in the package. Nothing is
    added to sys.path: config files import each other as `from sgm_jax.configs import ...`.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_file_location(f"_sgm_jax_config_{path.stem}", path))  # type: ignore[arg-type]
        module.__spec__.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        name = _packaged_module(text)
        if name is None:
            raise UserError(f"config {text!r} not found: neither a file nor one of the configs shipped with "
                            f"sgm_jax ({', '.join(packaged_config_names())})")
        module = importlib.import_module(name)
    if not hasattr(module, "get_config"):
        raise UserError(f"config {text} has no get_config() function")
    return module.get_config()


# ----------------------------------------------------------------------------- overrides


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(other arguments, [(dotted field, raw value)]) from `--config.a.b=v` / `--config.a.b v`."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(OVERRIDE_PREFIX):
            field, eq, value = arg[len(OVERRIDE_PREFIX):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                value, i = args[i + 1], i + 1
            if not field:
                raise UserError(f"{arg}: name a field, e.g. --config.training.max_steps=100")
            overrides.append((field, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _keys(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if hasattr(node, "keys") else []


def _child(node: Any, part: str, done: str) -> Any:
    if isinstance(node, (list, tuple)):
        if not part.isdigit() or int(part) >= len(node):
            raise UserError(f"--config.{done}{part}: {done.rstrip('.')} is a list of {len(node)}; use an index "
                            f"0..{len(node) - 1}")
        return node[int(part)]
    if not hasattr(node, "keys"):
        raise UserError(f"--config.{done}{part}: {done.rstrip('.')} is a value, not a section")
    if part not in _keys(node):
        near = difflib.get_close_matches(part, _keys(node), n=1)
        hint = f" (did you mean --config.{done}{near[0]}?)" if near else f"; it has: {', '.join(_keys(node))}"
        section = "config" + ("." + done.rstrip(".") if done else "")
        raise UserError(f"--config.{done}{part}: no field {part!r} in {section}{hint}")
    return node[part]


def parse_value(raw: str, current: Any, field: str) -> Any:
    """`raw` as the type of the field's current value."""
    def bad(kind: str) -> UserError:
        return UserError(f"--config.{field}={raw}: expected {kind} (the field holds {current!r})")

    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("true or false")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise bad("a tuple such as (1,2)") from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    if hasattr(current, "keys"):
        raise UserError(f"--config.{field} is a section; set one of its fields: {', '.join(_keys(current))}")
    try:  # None or anything else: a Python literal, else the string itself
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(config: Any, overrides: Sequence[tuple[str, str]]) -> Any:
    """Set every (dotted field, raw value) on `config` in place; UserError for any bad one. A
    ConfigDict is then locked (as ml_collections' config_flags(lock_config=True) leaves it): code
    may change its fields but not add new ones, so a misspelt field fails where it is written."""
    for field, raw in overrides:
        parts = field.split(".")
        node, done = config, ""
        for part in parts[:-1]:
            node = _child(node, part, done)
            done += part + "."
        current = _child(node, parts[-1], done)
        value = parse_value(raw, current, field)
        try:
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (TypeError, ValueError) as e:  # ConfigDict's type safety
            raise UserError(f"--config.{field}={raw}: {e}") from None
    if isinstance(config, ConfigDict):
        config.lock()
    return config
