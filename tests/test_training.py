"""The MNIST training slice: configs, a real short run, exact resume, EMA, SIGTERM, sampling."""

from __future__ import annotations

import json
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import DATA, REPO
from sgm_jax.engine import build_engine
from sgm_jax.inference.workdir import example_batch, sample_trained
from sgm_jax.optim import ema_decay, ema_update

sys.path.insert(0, str(REPO))
from sgm_jax.configs import cifar10_cond, mnist, mnist_cond, mnist_cond_cpu, mnist_cond_discrete_eps  # noqa: E402
from sgm_jax.configs import mnist_cond_l1_loss, mnist_cond_with_ema  # noqa: E402

CONFIGS = {"mnist": mnist, "mnist_cond": mnist_cond, "mnist_cond_discrete_eps": mnist_cond_discrete_eps,
           "mnist_cond_l1_loss": mnist_cond_l1_loss, "mnist_cond_with_ema": mnist_cond_with_ema,
           "cifar10_cond": cifar10_cond, "mnist_cond_cpu": mnist_cond_cpu}


def tiny_config(**training):
    """mnist_cond with a one-level UNet and small batches: seconds per step on a CPU."""
    config = mnist_cond.get_config()
    config.model.base_learning_rate = 1e-3
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1], num_head_channels=32)
    config.model.params.sampler_config.params.num_steps = 4
    mnist_path = DATA / "mnist"
    config.data.params.update(batch_size=8, path=str(mnist_path) if mnist_path.is_dir() else "")
    config.training.update({"log_every": 2, "checkpoint_every": 1000, "sample_every": 0, "num_samples": 4,
                            "sample_nrow": 4, **training})
    return config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_builds_the_seed_network(name):
    config = CONFIGS[name].get_config()
    engine = build_engine(config.model)
    net = config.model.params.network_config.params
    shape = (32, 32, 3) if name == "cifar10_cond" else (28, 28, 1)
    abstract = jax.eval_shape(engine.init_params, jax.random.key(0), example_batch(engine, shape))
    x = jnp.zeros((2,) + shape)
    out = jax.eval_shape(lambda p: engine.denoise(p, x, jnp.ones((2,)), engine.condition(
        p, {"cls": jnp.zeros((2,), jnp.int32)})), abstract)
    chex.assert_shape(out, (2,) + shape)
    if name == "mnist":
        assert "label_emb_0" not in abstract["model"]
    else:
        chex.assert_shape(abstract["model"]["label_emb_0"]["0"]["kernel"], (128, 4 * net.model_channels))
    if name in ("mnist_cond", "mnist_cond_with_ema", "mnist_cond_l1_loss", "mnist_cond_discrete_eps"):
        # the seed yaml's hyperparameters, unchanged
        assert config.model.base_learning_rate == 1e-4 and config.data.params.batch_size == 512
        assert net.num_res_blocks == 4 and list(net.channel_mult) == [1, 2, 2] and net.adm_in_channels == 128
        n = sum(v.size for v in jax.tree_util.tree_leaves(abstract["model"]))
        assert n == 2_600_705  # parameters in the seed's own mnist_cond UNet (fixtures/unet/mnist_cond)


def test_seed_variants_differ_where_the_seed_yaml_does():
    assert build_engine(mnist_cond_discrete_eps.get_config().model).denoiser.num_idx == 1000
    assert build_engine(mnist_cond_l1_loss.get_config().model).loss_fn.loss_type == "l1"
    assert mnist_cond_with_ema.get_config().model.params.use_ema
    assert build_engine(mnist_cond_discrete_eps.get_config().model).sampler.guider.scale == 5.0
    assert build_engine(mnist.get_config().model).conditioner.specs == ()


def test_ema_follows_litema():
    e, p = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}
    d = ema_decay(jnp.array(1), 0.9999)
    np.testing.assert_allclose(float(d), 2 / 11)
    np.testing.assert_allclose(np.asarray(ema_update(e, p, d)["w"]), [1 + (1 - 2 / 11) * 2, 2 - (1 - 2 / 11) * 2],
                               rtol=1e-6)
    assert float(ema_decay(jnp.array(10**7), 0.9999)) == pytest.approx(0.9999)


def _fixed_loss(engine, params, batch):
    return float(engine.loss(params, batch, jax.random.key(123))[0])


def test_short_real_training_lowers_the_loss_and_resume_is_exact(tmp_path):
    from sgm_jax.training.loop import train
    from sgm_jax.inference.workdir import load_trained

    # uninterrupted: 12 steps. interrupted: 6 steps, then resumed to 12 in a new train() call
    full = train(tiny_config(max_steps=12, checkpoint_every=6, sample_every=12), tmp_path / "full")
    assert full["step"] == 12 and "mnist" in full["data"]
    part = train(tiny_config(max_steps=6), tmp_path / "resumed")
    assert part["step"] == 6
    resumed = train(tiny_config(max_steps=12), tmp_path / "resumed")
    assert resumed["step"] == 12
    _, engine, p_full, _ = load_trained(tmp_path / "full", use_ema=False)
    _, _, p_resumed, _ = load_trained(tmp_path / "resumed", use_ema=False)
    chex.assert_trees_all_equal(p_full, p_resumed)  # same data order, same RNG: bit-identical

    # the loss on a fixed batch and key falls from the initial params
    _, _, p_early, _ = load_trained(tmp_path / "full", use_ema=False, step=6)
    from sgm_jax.data import MnistDataset

    batch = MnistDataset(DATA / "mnist" if (DATA / "mnist").is_dir() else None, split="test").batch_at(0, 256)
    init = engine.init_params(jax.random.key(0), {k: v[:2] for k, v in batch.items()})
    losses = [_fixed_loss(engine, p, batch) for p in (init, p_early, p_full)]
    assert losses[2] < 0.8 * losses[0], losses

    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 13, 2)) and all(r["steps_per_sec"] > 0 for r in rows)
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    grid = Image.open(tmp_path / "full" / "samples" / "step_0000012.png")
    assert grid.size[0] > 4 * 28 and grid.text["step"] == "12"

    images, labels = sample_trained(tmp_path / "full", classes=[3, 7], num_per_class=2, steps=3, cfg_scale=2.0)
    chex.assert_shape(images, (4, 28, 28, 1))
    np.testing.assert_array_equal(labels, [3, 3, 7, 7])
    assert np.isfinite(images).all()
    with pytest.raises(ValueError, match="out of range"):
        sample_trained(tmp_path / "full", classes=[12], steps=2)


def test_ema_covers_every_trainable_parameter(tmp_path):
    from sgm_jax.training.loop import build_run

    config = tiny_config(max_steps=2)
    config.model.params.use_ema = True
    run = build_run(config)
    state = run.init_fn(jax.random.key(0))
    before = jax.device_get(state.params)
    batch = run.dataset.batch_at(0, 8)
    state, _, _ = run.step_fn(state, batch, jax.random.key(1), run.nonfinite_start(), None)
    after, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
    # the class embedding (a trainable embedder, forgotten by the seed's EMA) moves in both
    emb = ("conditioner", "embedders_0")
    assert not np.allclose(before[emb[0]][emb[1]]["embedding"]["embedding"],
                           after[emb[0]][emb[1]]["embedding"]["embedding"])
    d = 2 / 11  # LitEma decay at the first update
    for b, a, e in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after),
                       jax.tree_util.tree_leaves(ema)):
        np.testing.assert_allclose(e, b - (1 - d) * (b - a), rtol=1e-5, atol=1e-7)


def test_missing_workdir_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found") as info:
        sample_trained(tmp_path / "nothing", classes=[1])
    assert "\n" not in str(info.value)
