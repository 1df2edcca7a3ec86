"""The train step's numerics knobs: gradient accumulation, remat (use_checkpoint), bf16 compute.

Each runs the real step (conditioner + denoiser + loss + masked AdamW + EMA) on a one-level
class-conditional UNet and real-shaped digits, and compares with an independent computation.
"""

from __future__ import annotations

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from sgm_jax.engine import build_engine
from sgm_jax.optim import ema_decay, ema_update, make_optimizer
from sgm_jax.training.state import TrainState, trainable_tree
from sgm_jax.training.step import init_train_state, make_train_step

sys.path.insert(0, str(REPO))
from sgm_jax.configs import mnist_cond  # noqa: E402

LR = 1e-3


def tiny_model_config(**unet_overrides):
    config = mnist_cond.get_config()
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1], **unet_overrides)
    return config.model


def batch(seed: int, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"jpg": rng.uniform(-1, 1, (n, 12, 12, 1)).astype(np.float32),
            "cls": rng.integers(0, 10, (n,)).astype(np.int32)}


def setup(grad_accum: int = 1, dtype: str = "float32", use_ema: bool = True, **unet_overrides):
    engine = build_engine(tiny_model_config(**unet_overrides), dtype=dtype)
    params = engine.init_params(jax.random.key(0), batch(0, 1))
    trainable = trainable_tree(engine.conditioner, params)
    tx = make_optimizer(LR, trainable)
    step = jax.jit(make_train_step(engine, tx, ema_rate=0.999 if use_ema else None, grad_accum=grad_accum))
    return engine, trainable, tx, step, init_train_state(params, tx, use_ema=use_ema)


def stacked(*batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def test_gradient_accumulation_is_one_update_with_the_mean_gradient():
    engine, trainable, _, step, state0 = setup(grad_accum=2)
    key = jax.random.fold_in(jax.random.key(3), 0)  # the loop folds the step into the key
    b0, b1 = batch(1), batch(2)

    state1, _ = step(state0, stacked(b0, b1), key)
    assert int(state1.step) == 1  # one optimiser step, as the seed's global_step

    # reference: the mean of the two micro-batch gradients (micro-batch i with fold_in(key, i))
    loss_grad = jax.jit(jax.grad(lambda p, b, k: engine.loss(p, b, k)[0]))  # one compile serves both
    grad = lambda b, i: loss_grad(state0.params, b, jax.random.fold_in(key, i))
    mean_grad = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, grad(b0, 0), grad(b1, 1))
    tx1 = make_optimizer(LR, trainable)
    updates, _ = tx1.update(mean_grad, tx1.init(state0.params), state0.params)
    expected = optax.apply_updates(state0.params, updates)
    chex.assert_trees_all_close(state1.params, expected, atol=2e-6, rtol=1e-5)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(state1.params),
                                                            jax.tree_util.tree_leaves(state0.params)))
    assert moved > LR / 2, moved  # a real AdamW step happened (first step moves each weight ~lr)

    # EMA updates on every micro-batch, as the seed's on_train_batch_end does: first towards the
    # weights before the update, then towards the updated ones; LitEma's count is in micro-batches
    ema = ema_update(ema_update(state0.ema_params, state0.params, ema_decay(jnp.array(1), 0.999)),
                     expected, ema_decay(jnp.array(2), 0.999))
    chex.assert_trees_all_close(state1.ema_params, ema, atol=2e-6, rtol=1e-5)
    state2, _ = step(state1, stacked(batch(3), batch(4)), jax.random.fold_in(jax.random.key(3), 1))
    assert int(state2.step) == 2


class _LinearRegression:
    """An engine whose loss draws no noise: the mean squared error of a linear map, per example."""

    def loss(self, params, batch, key):
        per_example = jnp.mean((batch["x"] @ params["model"]["w"] - batch["y"]) ** 2, axis=-1)
        return per_example.mean(), per_example


def test_two_micro_batches_of_b_equal_one_batch_of_2b():
    rng = np.random.default_rng(0)
    params = {"model": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}
    data = [{"x": rng.normal(size=(8, 3)).astype(np.float32), "y": rng.normal(size=(8, 2)).astype(np.float32)}
            for _ in range(3)]
    tx = make_optimizer(0.1, {"model": {"w": True}})
    results = {}
    for k in (1, 2):
        step = jax.jit(make_train_step(_LinearRegression(), tx, grad_accum=k))
        state = init_train_state(params, tx, use_ema=False)
        for b in data:  # batch 2B = 8 in one piece, or two micro-batches of 4
            state, metrics = step(state, b if k == 1 else {n: v.reshape(2, 4, -1) for n, v in b.items()},
                                  jax.random.key(0))
        results[k] = state, metrics
    (one, m1), (two, m2) = results[1], results[2]
    assert int(one.step) == int(two.step) == 3
    chex.assert_trees_all_close(two.params, one.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(two.opt_state, one.opt_state, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)


def test_remat_gives_the_same_step():
    """use_checkpoint wraps each block in nn.remat: recomputation must not change the update."""
    results = []
    for use_checkpoint in (False, True):
        _, _, _, step, state = setup(use_ema=False, use_checkpoint=use_checkpoint, dropout=0.1)
        state, metrics = step(state, batch(1), jax.random.key(5))
        results.append((state.params, metrics["loss"]))
    chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-6)
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_bfloat16_compute_keeps_float32_params_and_loss(use_checkpoint):
    _, _, _, step32, state32 = setup(use_ema=True)
    _, _, _, step16, state16 = setup(dtype="bfloat16", use_ema=True, use_checkpoint=use_checkpoint)
    chex.assert_trees_all_equal(state16.params, state32.params)  # same init: dtype is compute only
    losses32, losses16 = [], []
    for i in range(3):
        state32, m32 = step32(state32, batch(10 + i, 8), jax.random.key(i))
        state16, m16 = step16(state16, batch(10 + i, 8), jax.random.key(i))
        losses32.append(float(m32["loss"]))
        losses16.append(float(m16["loss"]))
        chex.assert_type(m16["loss"], jnp.float32)
    assert isinstance(state16, TrainState)
    for tree in (state16.params, state16.ema_params, state16.opt_state):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                chex.assert_type(leaf, jnp.float32)
    np.testing.assert_allclose(losses16, losses32, rtol=3e-2)
    # bf16 activations, float32 master weights: the update still tracks the float32 one
    diff = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), state16.params, state32.params)
    assert max(float(d) for d in jax.tree_util.tree_leaves(diff)) < 3 * LR


def _torch_adam_steps(w, grads, lr, b1, b2, eps, weight_decay, decoupled):
    """torch.optim.Adam / AdamW's update rule written out (numpy float64), one step per gradient."""
    m = v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        if decoupled:  # AdamW: p *= 1 - lr * wd before the Adam step
            w = w * (1.0 - lr * weight_decay)
        else:  # Adam: L2, weight_decay * p added to the gradient
            g = g + weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w


@pytest.mark.parametrize("target,decoupled", [("torch.optim.Adam", False), ("torch.optim.AdamW", True)])
def test_the_seeds_optimizer_config_is_torchs_update_rule(target, decoupled):
    """One builder for the diffusion and the autoencoder trainers: the seed's optimizer_config as torch
    defines its Adam (L2 weight decay) and AdamW (decoupled), against the update rule written out."""
    from sgm_jax.errors import UserError
    from sgm_jax.optim import seed_optimizer

    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(3)]
    config = {"target": target, "params": {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}}
    tx = seed_optimizer(config, 0.01)
    w, state = jnp.asarray(w0, jnp.float32), tx.init(jnp.asarray(w0, jnp.float32))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
    expected = _torch_adam_steps(w0, grads, 0.01, 0.8, 0.99, 1e-6, 0.1, decoupled)
    np.testing.assert_allclose(np.asarray(w), expected, rtol=2e-5, atol=2e-6)
    with pytest.raises(UserError, match="'torch.optim.SGD' is not supported"):
        seed_optimizer({"target": "torch.optim.SGD"}, 0.01)
    with pytest.raises(UserError, match=r"\['momentum'\] are not supported"):
        seed_optimizer({"target": target, "params": {"momentum": 0.9}}, 0.01)
