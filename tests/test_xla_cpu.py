"""The XLA:CPU flag that `import sgm_jax` adds: only when supported, never twice, opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from sgm_jax.xla_cpu import CPU_FLAGS, _jaxlib_knows, apply_cpu_defaults, flag_name

FLAG_NAME = flag_name(CPU_FLAGS[0])


def test_flag_is_appended_to_the_users_flags_once():
    if not _jaxlib_knows(FLAG_NAME):
        assert apply_cpu_defaults({"XLA_FLAGS": "--xla_foo=1"}) == []
        return
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_cpu_defaults(env) == list(CPU_FLAGS)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + CPU_FLAGS[0]
    assert apply_cpu_defaults(env) == []  # already there
    users_choice = {"XLA_FLAGS": f"--{FLAG_NAME}=default"}
    assert apply_cpu_defaults(users_choice) == [] and users_choice["XLA_FLAGS"] == f"--{FLAG_NAME}=default"
    assert apply_cpu_defaults({"SGM_JAX_XLA_CPU_DEFAULTS": "0"}) == []


def test_unknown_names_are_never_added():
    assert not _jaxlib_knows("xla_cpu_no_such_flag_in_any_jaxlib_build")


def test_import_sets_the_flag_before_the_backend_starts():
    """`import jax` first, then sgm_jax, then compute: XLA accepts the flag (an unknown one aborts)."""
    code = ("import os, jax, sgm_jax, jax.numpy as jnp; print(float(jnp.ones(3).sum())); "
            "print(os.environ.get('XLA_FLAGS', ''))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-2000:]
    total, flags = out.stdout.splitlines()[-2:]
    assert total == "3.0"
    assert (FLAG_NAME in flags) == _jaxlib_knows(FLAG_NAME)
