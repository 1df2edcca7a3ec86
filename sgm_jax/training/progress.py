"""What a training run shows while it runs: the progress bar and the skipped-update watch.

Both read only what the loop already fetches at log steps, so a healthy run pays no host sync
for them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from sgm_jax.errors import UserError

# the guarded step's carry (loop.guarded): int32 [skipped in a row, step of the first skipped update of a
# streak not yet reported (0: none), what was not finite in it (bits below)]
RUN, FIRST_STEP, FIRST_WHAT = 0, 1, 2
CARRY_SHAPE = (3,)
LOSS_BAD, GRAD_BAD = 1, 2


def progress_bar(start: int, max_steps: int, max_seconds: float, enabled: bool) -> tqdm:
    """A time-budgeted run stops at the budget long before max_steps (a run-forever default): its
    bar shows the step count and elapsed / budget, never max_steps as a total with its ETA."""
    if not max_seconds:
        return tqdm(total=max_steps, initial=start, desc="train", disable=not enabled, dynamic_ncols=True)
    budget = tqdm.format_interval(max_seconds)
    return tqdm(total=None, initial=start, desc="train", disable=not enabled, dynamic_ncols=True, unit="step",
                bar_format="{desc}: step {n_fmt} [{elapsed} / " + budget + " budget, {rate_fmt}{postfix}]")


def nonfinite_what(loss_ok: jax.Array, grad_ok: jax.Array) -> jax.Array:
    return (1 - loss_ok.astype(jnp.int32)) * LOSS_BAD + (1 - grad_ok.astype(jnp.int32)) * GRAD_BAD


def next_carry(carry: jax.Array, ok: jax.Array, what: jax.Array, done: jax.Array) -> jax.Array:
    """The carry after step `done` (inside the jitted step): no extra dispatch, no host sync. The
    first skipped update of a streak is remembered until the watch has reported it."""
    first = (carry[FIRST_STEP] == 0) & (carry[RUN] == 0) & ~ok
    return jnp.stack([jnp.where(ok, 0, carry[RUN] + 1), jnp.where(first, done, carry[FIRST_STEP]),
                      jnp.where(first, what, carry[FIRST_WHAT])]).astype(jnp.int32)


def _describe(what: int) -> str:
    return {LOSS_BAD: "loss", GRAD_BAD: "gradient"}.get(what, "loss and gradient")


class NonfiniteWatch:
    """At log and checkpoint steps (the carry is read there anyway): one warning line naming the
    first skipped update since the last look, and the divergence error past max_nonfinite_steps.
    Every host reads the same replicated carry, so all stop at the same step; process 0 prints."""

    def __init__(self, max_run: int, latest_checkpoint: Callable[[], int | None], report: Callable[[str], None],
                 sharding: Any):
        self.max_run, self.latest_checkpoint, self.report = max_run, latest_checkpoint, report
        # placed as the step returns it: a differently placed input would compile the step a second time
        self.sharding = sharding
        self._reset = jax.jit(lambda c: c.at[FIRST_STEP:].set(0), out_shardings=sharding)

    def check(self, carry: jax.Array, step: int) -> jax.Array:
        run, first, what = (int(v) for v in jax.device_get(carry))
        if first:
            self.report(f"warning: step {first}: {_describe(what)} not finite, update skipped ({run} skipped in a "
                        f"row at step {step}; the run stops after training.max_nonfinite_steps={self.max_run}); "
                        "lower model.base_learning_rate or set training.grad_clip if this repeats")
            carry = self._reset(carry)
        if run > self.max_run:
            last = self.latest_checkpoint()
            raise UserError(f"training diverged: loss or gradient not finite for {run} steps in a row up to step "
                            f"{step} (those updates were skipped; nothing non-finite was saved; last checkpoint: "
                            f"{last if last is not None else 'none'}); lower model.base_learning_rate or set "
                            "training.grad_clip", exit_code=3)
        return carry

    def initial(self) -> jax.Array:
        return jax.device_put(jnp.zeros((3,), jnp.int32), self.sharding)
