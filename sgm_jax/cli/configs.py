"""The command lines' face of sgm_jax.config_files: an argparse whose usage errors are one line,
and the config loader and `--config.a.b=value` overrides every command takes."""

from __future__ import annotations

import argparse

from sgm_jax.config_files import (
    OVERRIDE_PREFIX,
    PACKAGE,
    apply_overrides,
    config_name,
    load_config,
    packaged_config_names,
    packaged_configs_dir,
    parse_value,
    split_overrides,
)
from sgm_jax.errors import fail

__all__ = ["ArgumentParser", "OVERRIDE_PREFIX", "PACKAGE", "apply_overrides", "config_name", "load_config",
           "packaged_config_names", "packaged_configs_dir", "parse_value", "split_overrides"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line (exit 2), like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        fail(f"{self.prog}: {message} (--help lists the flags)")
