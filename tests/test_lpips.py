"""LPIPS: the converter CLI on torchvision / lpips-layout files, parity with a PyTorch LPIPS
(the seed's formulas, random VGG weights), and the one-line stop when weights are absent."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from sgm_jax.autoencoding import lpips as lp
from sgm_jax.convert import lpips as conv
from sgm_jax.errors import UserError
from sgm_jax.nn.lpips import LPIPS


def random_lpips_weights(rng):
    """Random weights in the two source layouts: torchvision's VGG16 `features.*` (He-scaled,
    so activations keep their size through 13 convs) and the LPIPS heads (non-negative, as trained)."""
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), conv.abstract_lpips_params())
    vgg, heads = conv.export_lpips(params)
    for k, v in vgg.items():
        fan_in = int(np.prod(v.shape[1:])) if v.ndim == 4 else 1
        vgg[k] = (rng.normal(size=v.shape) * np.sqrt(2.0 / fan_in) if v.ndim == 4 else rng.normal(size=v.shape) * 0.1
                  ).astype(np.float32)
    heads = {k: np.abs(rng.normal(size=v.shape)).astype(np.float32) * 0.1 for k, v in heads.items()}
    return vgg, heads


def random_lpips_files(tmp_path, rng):
    """random_lpips_weights as .safetensors files, the VGG16 one with a classifier key (ignored)."""
    from safetensors.numpy import save_file

    vgg, heads = random_lpips_weights(rng)
    vgg["classifier.0.weight"] = np.zeros((8, 8), np.float32)
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    save_file(heads, str(tmp_path / "heads.safetensors"))
    return vgg, heads


def test_converter_cli_and_parity_with_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from autoencoding_reference import TorchLPIPS

    rng = np.random.default_rng(0)
    vgg, heads = random_lpips_files(tmp_path, rng)
    with pytest.raises(SystemExit) as exit_info:
        conv.main(["--vgg", str(tmp_path / "vgg16.safetensors"), "--heads", str(tmp_path / "heads.safetensors"),
                   "--output", str(tmp_path / "lpips")])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    params = lp.load_lpips_params(tmp_path / "lpips")
    ref = TorchLPIPS().load_from(vgg, heads).eval()
    for channels in (3, 1):  # a grey image broadcasts to the three VGG channels, as in PyTorch
        x0 = rng.uniform(-1, 1, size=(2, 32, 32, channels)).astype(np.float32)
        x1 = np.clip(x0 + rng.normal(size=x0.shape).astype(np.float32) * 0.3, -1, 1)
        ours = np.asarray(jax.jit(lambda p, a, b: LPIPS().apply({"params": p}, a, b))(params, x0, x1))
        with torch.no_grad():
            theirs = ref(torch.from_numpy(x0.transpose(0, 3, 1, 2)), torch.from_numpy(x1.transpose(0, 3, 1, 2)))
        theirs = theirs.numpy().reshape(-1)
        np.testing.assert_allclose(ours, theirs, rtol=2e-5)
        assert ours.min() > 0
    # identical images are at distance 0; the exported tree round-trips bit for bit
    assert float(jax.jit(lambda p, a: LPIPS().apply({"params": p}, a, a))(params, x0)[0]) < 1e-9
    vgg2, heads2 = conv.export_lpips(params)
    assert all(np.array_equal(vgg2[k], vgg[k]) for k in vgg2) and set(heads2) == set(heads)


def test_dropout_matches_the_seeds_training_mode_in_expectation(tmp_path):
    rng = np.random.default_rng(1)
    vgg, heads = random_lpips_files(tmp_path, rng)
    params = conv.convert_lpips(vgg, heads)
    x0 = rng.uniform(-1, 1, size=(1, 16, 16, 3)).astype(np.float32)
    x1 = np.clip(x0 + 0.3, -1, 1)  # (16 px: VGG's last stage sees 1x1)
    net = LPIPS()
    fn = jax.jit(jax.vmap(lambda k: net.apply({"params": params}, x0, x1, k)))
    draws = np.asarray(fn(jax.random.split(jax.random.key(0), 64)))
    exact = float(net.apply({"params": params}, x0, x1)[0])
    assert draws.std() > 0.01 * exact  # dropout is on
    assert abs(draws.mean() - exact) < 4 * draws.std() / np.sqrt(64)  # and unbiased (1 / keep scaling)


def test_seed_layout_backbone_and_real_heads_file(tmp_path):
    """The seed's LPIPS state dict names the backbone net.slice<k>.<i>; the lpips package's
    heads file (when installed) is the seed's vgg_lpips file and converts."""
    rng = np.random.default_rng(2)
    vgg, heads = random_lpips_files(tmp_path, rng)
    seed_keys = conv.lpips_key_map(conv.abstract_lpips_params(), seed_layout=True)
    tv_keys = conv.lpips_key_map(conv.abstract_lpips_params())
    as_seed = {seed_keys[p][0]: vgg[tv_keys[p][0]] for p in seed_keys if p[0] == "net"}
    assert "net.slice1.0.weight" in as_seed and "net.slice5.28.bias" in as_seed and "net.slice2.5.weight" in as_seed
    a, b = conv.convert_lpips(as_seed, heads), conv.convert_lpips(vgg, heads)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    heads_file = conv.default_heads_file()
    if heads_file is None:
        pytest.skip("the lpips package (pip install --no-deps lpips) is not installed")
    pytest.importorskip("torch")
    assert hashlib.md5(heads_file.read_bytes()).hexdigest() == conv.HEADS_MD5
    from sgm_jax.convert.files import open_checkpoint

    real = conv.convert_lpips(vgg, open_checkpoint(heads_file, allow_pickle=True))
    assert real["lin4"]["kernel"].shape == (1, 1, 512, 1) and float(real["lin0"]["kernel"].min()) >= 0


def test_missing_weights_stop_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(lp.ENV_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setattr(lp, "DEFAULT_DIR", tmp_path / "also_nowhere")
    assert lp.find_lpips_weights() is None
    with pytest.raises(UserError) as e:
        lp.load_lpips_params()
    msg = str(e.value)
    assert "\n" not in msg and "perceptual_weight=0" in msg and "sgm_jax.convert.lpips" in msg
    # a training config asking for LPIPS stops before building anything
    from sgm_jax.training.autoencoder_task import AutoencoderTask
    from sgm_jax.configs import autoencoder_mnist

    config = autoencoder_mnist.get_config()
    config.model.params.loss_config.params.perceptual_weight = 0.25
    with pytest.raises(UserError, match="perceptual_weight=0"):
        AutoencoderTask(config, dataset=None)
