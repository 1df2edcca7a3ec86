"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time


def time_calls(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters



def flops_of(compiled) -> float:
    """FLOPs from XLA's cost analysis of a compiled executable (dict, or a list of dicts in old jax)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))
