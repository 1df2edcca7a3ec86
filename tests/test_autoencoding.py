"""Autoencoder training: GeneralLPIPSWithDiscriminator and NLayerDiscriminator against a PyTorch
reference of the seed's formulas (both optimizer indices, before / after disc_start, the adaptive
weight), the one-backward-pass gradient, a real MNIST run whose error falls, exact resume with two
optimisers through the training loop, and the trained workdir as a seed-layout first stage."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax.autoencoding import losses
from sgm_jax.autoencoding.discriminator import NLayerDiscriminator
from sgm_jax.autoencoding.engine import build_parts, init_state
from sgm_jax.autoencoding.step import autoencoder_grads
from sgm_jax.configs import autoencoder_kl_f4, autoencoder_mnist

# ----------------------------------------------------------------------------- loss parity


def _loss_setup(rng, perceptual: bool, disc_loss: str):
    """Inputs, a decoder 'last layer' (3x3 conv on fixed features h), discriminator, LPIPS."""
    cfg = dict(disc_start=5, logvar_init=0.3, disc_factor=0.7, disc_weight=0.5, disc_loss=disc_loss,
               perceptual_weight=0.25 if perceptual else 0.0, learn_logvar=True, disc_in_channels=3,
               disc_num_layers=2, regularization_weights={"kl_loss": 0.1})
    x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    h = rng.normal(size=(2, 16, 16, 8)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 8, 3)) * 0.1).astype(np.float32)
    bias = (rng.normal(size=(3,)) * 0.1).astype(np.float32)
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2)
    disc_vars = jax.tree_util.tree_map(np.asarray, disc.init(jax.random.key(3), x, train=True))
    lpips_params = None
    if perceptual:
        from test_lpips import random_lpips_weights

        from sgm_jax.convert import lpips as conv

        vgg, heads = random_lpips_weights(rng)
        lpips_params = (vgg, heads, conv.convert_lpips(vgg, heads))
    return cfg, x, h, kernel, bias, disc, disc_vars, lpips_params


def _ours(cfg, x, h, kernel, bias, disc, disc_vars, lpips_params, step, optimizer_idx):
    import flax.linen as nn

    from sgm_jax.nn.lpips import LPIPS

    lc = losses.LossConfig.from_params(cfg)
    conv = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))
    decode = lambda k, hh: conv.apply({"params": {"kernel": k, "bias": bias}}, hh)  # noqa: E731
    perceptual = None if lpips_params is None else (
        lambda a, b: LPIPS().apply({"params": lpips_params[2]}, a, b))
    kl = jnp.float32(3.0)
    active = jnp.asarray(step >= cfg["disc_start"])
    if optimizer_idx == 1:
        rec = decode(kernel, h)
        (loss, (log, stats)), grads = jax.value_and_grad(
            lambda p: losses.discriminator_loss(lc, disc, p, disc_vars["batch_stats"], x, rec), has_aux=True)(
            disc_vars["params"])
        if not step >= cfg["disc_start"]:  # the step skips the update; the seed's zero loss has no gradient
            loss = jnp.float32(0.0)
        return loss, log, {"disc": grads}, stats
    rec, vjp = jax.vjp(decode, kernel, h)
    last_layer = lambda ct: vjp(ct)[0]  # noqa: E731
    ct, logvar_grad, log, stats = losses.autoencoder_objective(
        lc, disc, x, rec, jnp.float32(cfg["logvar_init"]), disc_vars, {"kl_loss": kl}, last_layer, active, perceptual)
    k_grad, h_grad = vjp(ct)
    return log["loss/total"], log, {"kernel": k_grad, "h": h_grad, "logvar": logvar_grad}, stats


def _theirs(torch, cfg, x, h, kernel, bias, disc_vars, lpips_params, step, optimizer_idx):
    from autoencoding_reference import TorchLPIPS, TorchNLayerDiscriminator, disc_state_dict, general_loss

    disc = TorchNLayerDiscriminator(3, 8, 2)
    disc.load_state_dict(disc_state_dict(disc_vars["params"], disc_vars["batch_stats"]))
    disc.train()
    lpips = None
    if lpips_params is not None:
        lpips = TorchLPIPS().load_from(lpips_params[0], lpips_params[1]).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    xt = t(x.transpose(0, 3, 1, 2))
    ht = t(h.transpose(0, 3, 1, 2)).requires_grad_(True)
    w = t(kernel.transpose(3, 2, 0, 1)).requires_grad_(True)
    logvar = torch.tensor(cfg["logvar_init"], requires_grad=True)
    rec = torch.nn.functional.conv2d(ht, w, t(bias), padding=1)
    loss, log = general_loss(cfg, disc, lpips, xt, rec, logvar, {"kl_loss": torch.tensor(3.0)},
                             optimizer_idx=optimizer_idx, global_step=step, last_layer=w)
    grads = {}
    if loss.requires_grad:
        loss.backward()
        if optimizer_idx == 0:
            grads = {"kernel": w.grad.numpy().transpose(2, 3, 1, 0), "h": ht.grad.numpy().transpose(0, 2, 3, 1),
                     "logvar": logvar.grad.numpy()}
        else:
            grads = {"disc": {n: p.grad.numpy() for n, p in disc.named_parameters()}}
    stats = {n: b.numpy() for n, b in disc.named_buffers() if "running" in n}
    return loss.detach().numpy(), {k: v.detach().numpy() for k, v in log.items()}, grads, stats


def _max_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    abs_err = float(np.abs(got - ref).max()) if got.size else 0.0
    return abs_err, abs_err / max(float(np.abs(ref).max()), 1e-12)


@pytest.mark.parametrize("perceptual,disc_loss", [(False, "hinge"), (True, "vanilla")])
def test_losses_match_the_seeds_formulas(perceptual, disc_loss):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg, x, h, kernel, bias, disc, disc_vars, lp = _loss_setup(rng, perceptual, disc_loss)
    errors = {}
    # before disc_start (step 4) LPIPS changes nothing GAN-related: checked without it only
    for step in ((5,) if perceptual else (4, 5)):
        for idx in (0, 1):
            loss, log, grads, stats = _ours(cfg, x, h, kernel, bias, disc, disc_vars, lp, step, idx)
            r_loss, r_log, r_grads, r_stats = _theirs(torch, cfg, x, h, kernel, bias, disc_vars, lp, step, idx)
            errors[(step, idx, "loss")] = _max_err(loss, r_loss)
            for k, v in r_log.items():
                errors[(step, idx, k)] = _max_err(log[k], v)
            for k, v in r_grads.items():
                if k == "disc":
                    for name, g in v.items():
                        index, leaf = name.split(".")[1:]
                        ours = grads["disc"][f"main_{index}"]["scale" if leaf == "weight" and g.ndim == 1 else
                                                               "kernel" if leaf == "weight" else "bias"]
                        errors[(step, idx, name)] = _max_err(ours if g.ndim != 4 else
                                                             np.asarray(ours).transpose(3, 2, 0, 1), g)
                else:
                    errors[(step, idx, k)] = _max_err(grads[k], v)
            active = step >= cfg["disc_start"]
            if active or idx == 1:  # running statistics move with every training-mode forward
                for name, v in r_stats.items():
                    index, which = name.split(".")[1], "mean" if name.endswith("mean") else "var"
                    errors[(step, idx, name)] = _max_err(stats[f"main_{index}"][which], v)
            if not active:
                assert float(log["scalars/d_weight"] if idx == 0 else loss) == 0.0
    # relative to each quantity's scale; near-zero scalars (e.g. mean logits ~1e-5) by absolute error
    bad = {k: e for k, e in errors.items() if e[0] > 1e-6 and e[1] > 1e-4}
    print("max abs error", max(e[0] for e in errors.values()), "max rel error (|ref| > 1e-6 scale)",
          max(e[1] for e in errors.values() if e[0] > 1e-6))
    assert not bad, bad
    # the adaptive weight really is exercised (neither clamped nor zero) after disc_start
    d_weight = _ours(cfg, x, h, kernel, bias, disc, disc_vars, lp, 5, 0)[1]["scalars/d_weight"]
    assert 0.0 < float(d_weight) < 1e4 * cfg["disc_weight"]


def test_discriminator_init_is_the_seeds():
    disc = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    v = jax.jit(lambda x: disc.init(jax.random.key(0), x, train=True))(jnp.zeros((1, 32, 32, 3)))
    p = v["params"]
    assert set(p) == {"main_0", "main_2", "main_3", "main_5", "main_6", "main_8", "main_9", "main_11"}
    w = np.concatenate([np.asarray(p[k]["kernel"]).ravel() for k in ("main_2", "main_5", "main_8")])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 5e-4
    s = np.concatenate([np.asarray(p[k]["scale"]) for k in ("main_3", "main_6", "main_9")])
    assert abs(s.mean() - 1.0) < 5e-3 and abs(s.std() - 0.02) < 3e-3
    assert "bias" not in p["main_2"] and not np.any(np.asarray(p["main_3"]["bias"]))
    bound = 1 / np.sqrt(3 * 16)  # PyTorch's default conv bias, untouched by weights_init
    b = np.asarray(p["main_0"]["bias"])
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.5 * bound
    assert jax.eval_shape(lambda x: disc.apply(v, x, train=False), jnp.zeros((2, 64, 64, 3))).shape == (2, 6, 6, 1)


# ----------------------------------------------------------------------------- training


def tiny_config():
    """autoencoder_mnist at test size: f2, 32 channels, a 2-layer PatchGAN with 8 filters."""
    config = autoencoder_mnist.get_config()
    enc = autoencoder_kl_f4.ddconfig(z_channels=4, resolution=32, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                                     num_res_blocks=1)
    for part in ("encoder_config", "decoder_config"):
        config.model.params[part].params = enc
    config.model.params.loss_config.params.discriminator_config.params.ndf = 8
    config.model.base_learning_rate = 1e-3
    config.data.params.batch_size = 8
    config.training.update(max_minutes=0.0, eval_examples=64, eval_batch_size=64, log_every=2, sample_every=0,
                           eval_every=0, checkpoint_every=1000)
    return config


def test_one_backward_pass_equals_the_naive_total_loss():
    """The step's gradient (total cotangent at x_rec, one backward pass) equals jax.grad of the
    seed's total loss with d_weight computed from separate last-layer gradients."""
    config = tiny_config()
    enc = autoencoder_kl_f4.ddconfig(z_channels=4, resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 1),
                                     num_res_blocks=1)
    for part in ("encoder_config", "decoder_config"):  # smaller still: this test differentiates four times
        config.model.params[part].params = enc
    config.model.params.loss_config.params.disc_start = 0
    parts = build_parts(config)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    state = init_state(parts, jax.random.key(0), x)
    key = jax.random.key(5)
    grads, log, _ = jax.jit(lambda s: autoencoder_grads(parts, s, x, key, None))(state)

    sample_key = jax.random.split(key)[0]
    disc_vars = {"params": state.disc_params, "batch_stats": state.disc_batch_stats}

    def pieces(ae, logvar):
        from sgm_jax.autoencoding.step import reconstruct

        rec, post = reconstruct(parts, ae, x, sample_key)
        nll = losses.nll_losses(jnp.abs(x - rec), logvar)
        g = -jnp.mean(losses.discriminator_apply(parts.discriminator, disc_vars, rec)[0])
        return nll, g, jnp.sum(post.kl()) / x.shape[0]

    ae, logvar = state.params["autoencoder"], state.params["logvar"]
    last = lambda i: jax.grad(lambda a: pieces(a, logvar)[i])(ae)["decoder"]["conv_out"]["kernel"]  # noqa: E731
    d_weight = losses.adaptive_weight(last(0), last(1), parts.loss.disc_weight)

    def total(ae, logvar):
        nll, g, kl = pieces(ae, logvar)
        return nll + d_weight * parts.loss.disc_factor * g + 1e-6 * kl

    ref = jax.grad(total, argnums=(0, 1))(ae, logvar)
    np.testing.assert_allclose(float(log["scalars/d_weight"]), float(d_weight), rtol=1e-4)
    got = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads["autoencoder"])])
    want = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(ref[0])])
    # elementwise up to float32 noise (some leaves, e.g. biases before a GroupNorm, are ~0 exactly)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_allclose(float(grads["logvar"]), float(ref[1]), rtol=1e-4)


# ----------------------------------------------------------------------------- loop, resume, first stage


def _params_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _restore_state(workdir):
    import orbax.checkpoint as ocp

    from sgm_jax.checkpointing.checkpoint import step_dirs

    ckpt = workdir / "checkpoints"
    step = max(step_dirs(ckpt))
    with ocp.PyTreeCheckpointer() as c:
        return c.restore((ckpt / str(step) / "state").absolute())


def test_mnist_through_the_loop_error_falls_exact_resume_and_first_stage(tmp_path):
    """train.py's loop on real MNIST (padded to 32x32): the reconstruction error falls, held-out
    metrics and the input/reconstruction grid are written, N steps == N/2 + resume N/2 bit for
    bit with both optimisers stepping in both halves, and the workdir serves as a first stage."""
    from sgm_jax.autoencoding import load_first_stage
    from sgm_jax.autoencoding.firststage import export_first_stage, save_first_stage
    from sgm_jax.training.loop import train

    config = tiny_config()
    config.model.params.loss_config.params.disc_start = 6
    config.training.update(max_steps=16, eval_every=16, sample_every=16)
    train(config, tmp_path / "full")
    config.training.max_steps = 8
    train(config, tmp_path / "resumed")
    config.training.max_steps = 16
    train(config, tmp_path / "resumed")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rec = [r["loss/rec"] for r in rows if "loss/rec" in r]
    assert rec[-1] < 0.7 * rec[0], rec
    evals = [r for r in rows if "eval/psnr" in r]
    assert evals and {"eval/l1", "eval/ssim", "eval/kl", "eval/logits_real", "eval/ema/psnr"} <= set(evals[-1])
    assert rows[-2]["loss/disc"] > 0  # the discriminator trained
    assert (tmp_path / "full" / "samples" / "step_0000016.png").is_file()
    full, resumed = _restore_state(tmp_path / "full"), _restore_state(tmp_path / "resumed")
    assert int(full["step"]) == int(resumed["step"]) == 16
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "disc_batch_stats", "ema_params"):
        assert _params_equal(full[part], resumed[part]), part
    assert int(np.asarray(jax.tree_util.tree_leaves(full["disc_opt_state"])[0])) == 10  # Adam count: steps 6..15

    # the workdir as a first stage (EMA), its seed-layout export and the converted directory
    fs_config, params = load_first_stage(tmp_path / "full")
    assert _params_equal(params, full["ema_params"])
    assert fs_config["target"].endswith("AutoencodingEngine") and "loss_config" in fs_config["params"]
    out = export_first_stage(tmp_path / "full", tmp_path / "ae.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as f:
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert json.loads(f.metadata()["first_stage_config"]) == json.loads(json.dumps(fs_config))
    listing = "\n".join(f"{k} {list(s)}" for k, s in sorted(keys.items()))
    assert all(k.startswith("first_stage_model.encoder.") or k.startswith("first_stage_model.decoder.") for k in keys)
    # sha256 of the sorted "key [shape]" lines of the seed's own AutoencodingEngine (sgm's Encoder
    # and Decoder built on torch's meta device from tiny_config's encoder_config / decoder_config)
    assert (len(keys), hashlib.sha256(listing.encode()).hexdigest()) == SEED_TINY_ENGINE
    conv = save_first_stage(tmp_path / "full", tmp_path / "converted")
    fs2, params2 = load_first_stage(conv)
    assert fs2 == json.loads(json.dumps(fs_config)) and _params_equal(params2, params)


SEED_TINY_ENGINE = (100, "801bdcda21d6a4490470ce058aa66788ae45f8caf5cdba60565e588a12f71952")
