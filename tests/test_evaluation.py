"""Evaluation: FID's InceptionV3 and Fréchet distance against pytorch-fid's own code, the CLIP
towers against transformers, SSIM against scikit-image, the MNIST classifier on real digits,
and evaluate.py end to end on real MNIST folders (random Inception weights: plumbing only).

pytorch-fid runs in a subprocess, from outside the venv: see sgm_jax/evaluation/pytorch_fid_ref.py
(pip install --no-deps --target ~/.cache/sgm_jax/torch_refs pytorch-fid==0.3.0 torchvision==0.28.0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import DATA, REPO
from sgm_jax.convert.common import CheckpointMismatchError
from sgm_jax.convert.files import save_safetensors
from sgm_jax.convert.inception import FID_WEIGHTS_NAME, convert_inception, export_inception, load_inception_params
from sgm_jax.evaluation.fid import (GaussianStats, InceptionFeatures, feature_statistics, frechet_distance,
                                    frechet_distance_stats, load_statistics)
from sgm_jax.evaluation.pytorch_fid_ref import INSTALL_HINT, subprocess_env
from sgm_jax.nn.inception import bilinear_matrix, random_inception_params

MNIST = DATA / "mnist"

# Runs pytorch-fid's real InceptionV3 (use_fid_inception=True: its FIDInceptionA/C/E blocks,
# resize and input scaling; random weights read by its own loader from TORCH_HOME) and its
# calculate_frechet_distance; writes the weights, inputs and outputs to argv[1].
_REFERENCE = r'''
import os, sys
import numpy as np, torch
from sgm_jax.evaluation.pytorch_fid_ref import import_pytorch_fid, random_weights_file
pfi = import_pytorch_fid()
from pytorch_fid.fid_score import calculate_frechet_distance
out = sys.argv[1]
os.environ["TORCH_HOME"] = os.path.join(os.path.dirname(out), "torch_home")
weights = torch.load(random_weights_file(os.environ["TORCH_HOME"]))
model = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
rng = np.random.default_rng(0)
x = rng.random((2, 3, 37, 45)).astype(np.float32)
with torch.no_grad():
    features = model(torch.from_numpy(x))[0][:, :, 0, 0].numpy()
stats, distances = {}, []
for i, (d, n1, n2, tiny) in enumerate([(64, 500, 400, 0.0), (256, 100, 120, 0.0), (128, 400, 300, 1e-10)]):
    mix = rng.normal(size=(d, d))
    if tiny:  # near-singular: all but 8 directions squashed to 1e-10
        mix[8:] *= tiny
    a = rng.normal(size=(n1, d)) @ mix * 0.1
    b = rng.normal(size=(n2, d)) @ mix * 0.1 + 0.05
    stats.update({f"a{i}": a, f"b{i}": b})
    m1, s1 = a.mean(0), np.cov(a, rowvar=False)
    m2, s2 = b.mean(0), np.cov(b, rowvar=False)
    distances.append(calculate_frechet_distance(m1, s1, m2, s2))
np.savez(out, x=x, features=features, distances=np.array(distances), **stats,
         **{"w/" + k: v.numpy() for k, v in weights.items()})
'''


@pytest.fixture(scope="module")
def pytorch_fid_reference(tmp_path_factory):
    pytest.importorskip("torch")
    env = subprocess_env()
    if env is None:
        pytest.skip(f"pytorch-fid is not installed: {INSTALL_HINT}")
    out = tmp_path_factory.mktemp("pytorch_fid") / "reference.npz"
    subprocess.run([sys.executable, "-c", _REFERENCE, str(out)], env=env, check=True, timeout=300)
    return dict(np.load(out))


def test_inception_matches_pytorch_fid(pytorch_fid_reference):
    ref = pytorch_fid_reference
    state_dict = {k[2:]: v for k, v in ref.items() if k.startswith("w/")}
    params = convert_inception(state_dict)  # pytorch-fid's file layout, fc.* ignored
    images = np.transpose(ref["x"], (0, 2, 3, 1)) * 2.0 - 1.0  # [0, 1] NCHW -> sgm_jax's [-1, 1] NHWC
    features = InceptionFeatures(params, batch_size=2)(images)
    err = np.abs(features - ref["features"]).max() / np.abs(ref["features"]).max()
    assert features.shape == (2, 2048) and err < 1e-4, err


def test_frechet_distance_matches_pytorch_fid(pytorch_fid_reference):
    ref = pytorch_fid_reference
    for i, expected in enumerate(ref["distances"]):
        a, b = ref[f"a{i}"], ref[f"b{i}"]
        full = frechet_distance(*feature_statistics(a), *feature_statistics(b))
        factored = frechet_distance_stats(GaussianStats.from_features(a), GaussianStats.from_features(b))
        mixed = frechet_distance_stats(GaussianStats(*feature_statistics(a)), GaussianStats.from_features(b))
        for value in (full, factored, mixed):
            assert abs(value - expected) <= 1e-6 * abs(expected) + 1e-9, (i, value, expected)
    assert ref["distances"][1] > 1.0  # the cases are not trivially zero


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, w in [(28, 28), (512, 333), (17, 300)]:
        x = rng.random((1, 2, h, w)).astype(np.float32)
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                                                   align_corners=False).numpy()
        got = np.einsum("oh,bchw,pw->bcop", bilinear_matrix(h, 299), x, bilinear_matrix(w, 299), optimize=True)
        np.testing.assert_allclose(got, expected, atol=5e-6)  # float32 rounding of the grid


def test_inception_weights_missing_and_mismatched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SGM_JAX_FID_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME) as err:
        load_inception_params()
    assert "\n" not in str(err.value) and str(tmp_path / ".cache" / "sgm_jax") in str(err.value)
    state_dict = export_inception(random_inception_params(0))
    state_dict["Mixed_5b.branch1x1.conv.weights"] = state_dict.pop("Mixed_5b.branch1x1.conv.weight")
    with pytest.raises(CheckpointMismatchError, match="missing keys.*Mixed_5b.branch1x1.conv.weight"):
        convert_inception(state_dict)


def test_clip_towers_and_score_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sgm_jax.convert.clip_vision import convert_clip_text, convert_clip_vision
    from sgm_jax.evaluation.clip_score import CLIPScore, load_clip_score_params, text_embeddings
    from sgm_jax.evaluation.fid import prepare_images
    from sgm_jax.nn.clip_vision import CLIPVisionTower, preprocess
    from sgm_jax.nn.text import CLIPTextTransformer
    from sgm_jax.nn.tokenizer import load_tokenizer, tokenize

    torch.manual_seed(0)
    config = transformers.CLIPConfig(  # CLIP ViT-L/14's layout and vocabulary, tiny widths
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=42, patch_size=14), projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint = save_safetensors({k: v.numpy() for k, v in model.state_dict().items()},
                                  tmp_path / "clip.safetensors")
    tower = CLIPVisionTower(image_size=42, patch_size=14, width=48, layers=2, heads=4, embed_dim=24, mlp_ratio=2.0)
    text = CLIPTextTransformer(width=32, layers=2, heads=4, intermediate_size=64)
    params = load_clip_score_params(str(checkpoint), tower, text)  # transformers layout, through the file reader
    tokenizer = load_tokenizer(DATA / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    prompts = ["a handwritten digit seven", "zero", "a photograph of the number three, blurred"]
    images = _mnist_or_skip().images[:3]
    pixels = np.asarray(preprocess(prepare_images(images), 42))
    ids = tokenize(tokenizer, prompts)
    with torch.no_grad():
        img_ref = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        txt_ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    img_ref = getattr(img_ref, "pooler_output", img_ref).numpy()
    txt_ref = getattr(txt_ref, "pooler_output", txt_ref).numpy()
    img = np.asarray(tower.apply({"params": params["vision"]}, pixels))
    txt = np.asarray(text_embeddings(text, params["text"], ids))
    assert np.abs(img - img_ref).max() < 1e-4 * np.abs(img_ref).max()
    assert np.abs(txt - txt_ref).max() < 1e-4 * np.abs(txt_ref).max()
    # torchmetrics' CLIPScore: mean over pairs of 100 * max(cos, 0) of the embeddings.
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(img_ref), torch.from_numpy(txt_ref)).numpy()
    scorer = CLIPScore(params, tokenizer, vision=tower, text=text, batch_size=2)
    np.testing.assert_allclose(scorer.per_image(images, prompts), np.maximum(100 * cos, 0), atol=1e-3)
    assert abs(scorer(images, prompts) - np.maximum(100 * cos, 0).mean()) < 1e-3 and np.ptp(cos) > 0.01
    # The same weights in the OpenAI / open_clip layout convert to the same params.
    openai = _openai_layout({k: v.numpy() for k, v in model.state_dict().items()})
    for a, b in zip(jax.tree_util.tree_leaves((convert_clip_vision(openai, tower), convert_clip_text(openai, text))),
                    jax.tree_util.tree_leaves((params["vision"], params["text"])), strict=True):
        np.testing.assert_array_equal(a, b)


def _openai_layout(hf: dict) -> dict:
    """transformers CLIPModel keys -> the OpenAI / open_clip state dict of the same weights."""
    hf = dict(hf)
    out = {"text_projection": hf.pop("text_projection.weight").T, "visual.proj": hf.pop("visual_projection.weight").T}
    names = [("vision_model.embeddings.patch_embedding.", "visual.conv1."),
             ("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
             ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
             ("text_model.embeddings.token_embedding.", "token_embedding."),
             ("text_model.final_layer_norm", "ln_final"), ("text_model.encoder.layers.", "transformer.resblocks."),
             ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    out["visual.class_embedding"] = hf.pop("vision_model.embeddings.class_embedding")
    out["visual.positional_embedding"] = hf.pop("vision_model.embeddings.position_embedding.weight")
    out["positional_embedding"] = hf.pop("text_model.embeddings.position_embedding.weight")
    for key in [k for k in hf if ".q_proj." in k]:
        qkv = [hf.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        hf[key.replace("self_attn.q_proj.", "attn.in_proj_")] = np.concatenate(qkv)
    for key, value in hf.items():
        for old, new in names:
            key = key.replace(old, new)
        out[key] = value
    return {k: v for k, v in out.items() if not k.endswith("position_ids") and k != "logit_scale"}


def test_clip_preprocess_close_to_transformers():
    transformers = pytest.importorskip("transformers")
    skimage = pytest.importorskip("skimage")
    from sgm_jax.nn.clip_vision import preprocess

    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    photo = skimage.data.chelsea()  # 300 x 451: resize of the short side, centre crop of the long one
    expected = processor(images=photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = np.asarray(preprocess(photo[None].astype(np.float32) / 255.0))[0]
    assert got.shape == expected.shape == (224, 224, 3)
    assert np.abs(got - expected).mean() < 0.01 and np.abs(got - expected).max() < 0.1


def test_clip_weights_missing_one_line(tmp_path, monkeypatch):
    from sgm_jax.convert.clip_vision import open_clip_checkpoint

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SGM_JAX_CLIP_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="model.safetensors of openai/clip-vit-large-patch14") as err:
        open_clip_checkpoint()
    assert "\n" not in str(err.value)


def test_ssim_psnr_match_skimage():
    skimage = pytest.importorskip("skimage")
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from sgm_jax.evaluation.reconstruction import reconstruction_metrics

    clean = skimage.data.astronaut()[::4, ::4]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    got = reconstruction_metrics(noisy[None], clean[None])
    ssim = structural_similarity(noisy / 255.0, clean / 255.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    assert abs(got["ssim"] - ssim) < 1e-5 and 0.3 < ssim < 0.9
    assert abs(got["psnr"] - peak_signal_noise_ratio(clean / 255.0, noisy / 255.0, data_range=1.0)) < 1e-4


def _mnist_or_skip():
    from sgm_jax.data import MnistDataset

    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found in {MNIST}")
    return MnistDataset(str(MNIST), split="test")


def test_classifier_evaluator_on_real_digits():
    from sgm_jax.evaluation.classifier import ClassifierEvaluator

    data = _mnist_or_skip()
    evaluator = ClassifierEvaluator.from_mnist(str(MNIST), limit=3000, epochs=1)
    images, labels = data.images[5000:5200], data.labels[5000:5200]  # digits it did not train on
    right = evaluator(images, list(labels))
    wrong = evaluator(images, list((labels + 1) % 10))
    assert evaluator.accuracy > 0.85 and right["class_accuracy"] > 0.85 and wrong["class_accuracy"] < 0.1


def test_training_evaluator(tmp_path):
    from sgm_jax.evaluation.in_training import make_training_evaluator

    data = _mnist_or_skip()
    assert make_training_evaluator({"every": 0, "metrics": ["fid"]}, (28, 28, 1)) is None
    with pytest.raises(ValueError, match="unknown field"):
        make_training_evaluator({"every": 5, "num_sample": 8}, (28, 28, 1))
    with pytest.raises(ValueError, match="28x28x1"):
        make_training_evaluator({"every": 5, "metrics": ["classifier"]}, (32, 32, 3))
    evaluator = make_training_evaluator(
        {"every": 5, "num_samples": 8, "metrics": ["reconstruction"], "ref": f"mnist:test:{MNIST}"}, (28, 28, 1))
    calls = []

    def generate(n, seed):  # the test split's first n digits, in [-1, 1]: a perfect "model"
        calls.append((n, seed))
        return data.images[:n].astype(np.float32) / 127.5 - 1.0, [int(c) for c in data.labels[:n]]

    metrics = evaluator(generate, 10)
    assert evaluator.due(10) and not evaluator.due(7) and calls == [(8, 0)]
    assert metrics["psnr"] > 100 and metrics["ssim"] > 0.9999 and metrics["num_images"] == 8


def test_evaluate_cli_on_mnist_folders(tmp_path):
    """Two disjoint halves of real digits are close; real vs a noised copy is far (random weights)."""
    from sgm_jax.cli.evaluate import main
    from sgm_jax.evaluation.images import save_image_folder

    data = _mnist_or_skip()
    digits = data.images[:24]
    noised = np.clip(digits[16:].astype(np.float32) + np.random.default_rng(0).normal(0, 80, (8, 28, 28, 1)), 0, 255)
    for name, images in (("a", digits[:8]), ("b", digits[8:16]), ("noised", noised.astype(np.uint8))):
        save_image_folder(tmp_path / name, images)
    weights = save_safetensors(export_inception(random_inception_params(0)), tmp_path / "inception.safetensors")
    common = ["--inception-weights", str(weights), "--batch-size", "8"]
    for argv in (["--images", str(tmp_path / "b"), "--ref", str(tmp_path / "a"), "--save-ref-stats",
                  str(tmp_path / "a.npz"), "--out", str(tmp_path / "b.json")],
                 ["--images", str(tmp_path / "noised"), "--ref", str(tmp_path / "a.npz"), "--out",
                  str(tmp_path / "noised.json")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv + common)
        assert exit_.value.code == 0
    close = json.loads((tmp_path / "b.json").read_text())["metrics"]["fid"]
    far = json.loads((tmp_path / "noised.json").read_text())["metrics"]["fid"]
    mu, sigma = load_statistics(tmp_path / "a.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert 0 < close and far > 2 * close, (close, far)


def test_evaluate_cli_missing_weights_one_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    env = dict(os.environ, HOME=str(tmp_path), TORCH_HOME=str(tmp_path / "torch"), SGM_JAX_FID_WEIGHTS="")
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--images", str(tmp_path / "imgs"),
                           "--ref", str(tmp_path / "imgs")], env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: FID InceptionV3 weights not found") and FID_WEIGHTS_NAME in lines[0]


def test_full_size_clip_vit_l14_layout():
    """Every key of transformers' CLIPModel for openai/clip-vit-large-patch14 (shapes only, meta
    device) maps onto the full-size towers, with no key left over."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sgm_jax.convert.clip_vision import OPENAI_PREFIX, openai_view
    from sgm_jax.convert.common import validate
    from sgm_jax.convert.text import text_key_map
    from sgm_jax.nn.clip_vision import VIT_L_14, CLIPVisionTower, abstract_vision_params
    from sgm_jax.nn.text import CLIPTextTransformer

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768), projection_dim=768)
    with torch.device("meta"):
        model = transformers.CLIPModel(config)

    class Shapes(dict):  # {key: shape}; the converter's validation reads shapes only
        def shape_of(self, key):
            return self[key]

    shapes = Shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert openai_view(shapes).unused_keys() == []
    odd = Shapes(shapes, **{"vision_model.encoder.layers.0.adapter.weight": (4, 4)})
    assert openai_view(odd).unused_keys() == ["vision_model.encoder.layers.0.adapter.weight"]
    validate(openai_view(shapes), text_key_map(abstract_vision_params(CLIPVisionTower(**VIT_L_14))),
             abstract_vision_params(CLIPVisionTower(**VIT_L_14)), prefix=OPENAI_PREFIX)
    text = CLIPTextTransformer()
    abstract = jax.eval_shape(lambda t: text.init(jax.random.key(0), t), jax.ShapeDtypeStruct((1, 77), np.int32))
    validate(shapes, text_key_map(abstract["params"]), abstract["params"], prefix="text_model.",
             ignore_unexpected=("position_ids",))
    assert shapes["text_projection.weight"] == (768, 768) and shapes["visual_projection.weight"] == (768, 1024)


def test_a_corrupt_or_truncated_statistics_file_is_one_line_naming_it(tmp_path, capsys):
    import pickle

    from sgm_jax.cli.evaluate import main
    from sgm_jax.evaluation.images import save_image_folder

    good = tmp_path / "good.npz"
    np.savez_compressed(good, mu=np.zeros(64), sigma=np.eye(64))
    files = {"garbage.npz": b"\xff\xfe not a zip at all", "truncated.npz": good.read_bytes()[:200],
             "object.npz": pickle.dumps({"mu": [0.0], "sigma": [[1.0]]})}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "bare.npy", np.zeros(3))
    (tmp_path / "bare.npy").rename(tmp_path / "bare.npz")
    for name in [*files, "bare.npz"]:
        with pytest.raises(ValueError) as info:
            load_statistics(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: not a statistics file (a .npz of arrays 'mu' and 'sigma'; "
                                  "this one is corrupt, truncated or another format: "), message
        assert message.endswith("write one with evaluate.py --ref IMAGES --save-ref-stats FILE.npz")
        assert "pickle" not in message.replace(str(tmp_path), "").lower() and "\n" not in message
    assert load_statistics(good)[1].shape == (64, 64)
    save_image_folder(tmp_path / "images", np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(SystemExit) as exit_:  # before any weights are looked for
        main(["--images", str(tmp_path / "images"), "--ref", str(tmp_path / "truncated.npz"), "--metrics", "fid",
              "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(f"error: {tmp_path / 'truncated.npz'}: not a statistics file")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.json").exists()
