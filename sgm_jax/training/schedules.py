"""The seed's learning-rate schedules (sgm/lr_scheduler.py) as optax schedules.

The seed wraps them in torch's LambdaLR: the k-th optimiser update (k = 0, 1, ...) uses
base_learning_rate * f(k). An optax schedule receives the same k (the update count), so
`optax.adamw(scale(base_lr, f))` reproduces it step for step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from sgm_jax.errors import UserError


def _cycles(warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
            f_start: Sequence[float], cycle_lengths: Sequence[int]) -> tuple[np.ndarray, ...]:
    lists = [warm_up_steps, f_min, f_max, f_start, cycle_lengths]
    if len({len(v) for v in lists}) != 1:
        raise UserError("scheduler_config: warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry "
                        "per cycle (equal lengths)")
    cum = np.cumsum([0] + [float(c) for c in cycle_lengths])
    return (np.asarray(warm_up_steps, np.float64), np.asarray(f_min, np.float64), np.asarray(f_max, np.float64),
            np.asarray(f_start, np.float64), np.asarray(cycle_lengths, np.float64), cum)


def _cycle_position(count: jnp.ndarray, cum: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The seed's find_in_interval (n <= cum[i + 1] -> cycle i) and n minus the cycle's start."""
    n = count.astype(jnp.float32)
    cycle = jnp.clip(jnp.searchsorted(jnp.asarray(cum[1:], jnp.float32), n, side="left"), 0, len(cum) - 2)
    return cycle, n - jnp.asarray(cum, jnp.float32)[cycle]


def lambda_linear(warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval: int = 0
                  ) -> Callable[[Any], jnp.ndarray]:
    """LambdaLinearScheduler: per cycle, linear warm-up f_start -> f_max, then linear f_max -> f_min
    over the cycle length (measured, as in the seed, from the cycle's start)."""
    warm, fmin, fmax, fstart, length, cum = _cycles(warm_up_steps, f_min, f_max, f_start, cycle_lengths)

    def f(count):
        c, n = _cycle_position(jnp.asarray(count), cum)
        w, lo, hi, st, ln = (jnp.asarray(a, jnp.float32)[c] for a in (warm, fmin, fmax, fstart, length))
        return jnp.where(n < w, (hi - st) / jnp.maximum(w, 1.0) * n + st, lo + (hi - lo) * (ln - n) / ln)

    return f


def lambda_warm_up_cosine2(warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval: int = 0
                           ) -> Callable[[Any], jnp.ndarray]:
    """LambdaWarmUpCosineScheduler2: linear warm-up, then a half cosine f_max -> f_min per cycle."""
    warm, fmin, fmax, fstart, length, cum = _cycles(warm_up_steps, f_min, f_max, f_start, cycle_lengths)

    def f(count):
        c, n = _cycle_position(jnp.asarray(count), cum)
        w, lo, hi, st, ln = (jnp.asarray(a, jnp.float32)[c] for a in (warm, fmin, fmax, fstart, length))
        t = jnp.minimum((n - w) / jnp.maximum(ln - w, 1.0), 1.0)
        return jnp.where(n < w, (hi - st) / jnp.maximum(w, 1.0) * n + st,
                         lo + 0.5 * (hi - lo) * (1.0 + jnp.cos(t * jnp.pi)))

    return f


SCHEDULERS = {"LambdaLinearScheduler": lambda_linear, "LambdaWarmUpCosineScheduler2": lambda_warm_up_cosine2}


def learning_rate_schedule(base_learning_rate: float, scheduler_config: Mapping[str, Any] | None,
                           warmup_steps: int = 0) -> optax.Schedule | float:
    """base_lr * the seed's `scheduler_config` multiplier; without one, our linear warm-up (or a constant)."""
    if scheduler_config:
        name = str(scheduler_config["target"]).rsplit(".", 1)[-1]
        if name not in SCHEDULERS:
            raise UserError(f"scheduler_config.target {scheduler_config['target']!r} is not supported; "
                            f"choose one of {', '.join(SCHEDULERS)}")
        factor = SCHEDULERS[name](**dict(scheduler_config.get("params") or {}))
        return lambda count: base_learning_rate * factor(count)
    if warmup_steps > 0:
        return optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
    return base_learning_rate
