"""Pre-encoding (sgm_jax.training.preencode): latent moments + frozen embeddings stored once, training
from them with the raw data's loss, sampling from the workdir, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import DATA
from sgm_jax.configs import _training_parts as T
from sgm_jax.configs import mnist_cond
from sgm_jax.configs.inference import _parts as P
from sgm_jax.errors import UserError

BPE = DATA / "clip" / "bpe_simple_vocab_16e6.txt.gz"
WIDTH, SIZE_DIM = 16, 8


def tiny_config(frozen_text: bool, urls: str = "", ckpt: str = ""):
    """A latent text-to-image model small enough for seconds per CPU step: f2 AutoencoderKL on
    32 px images, a CLIP-architecture text tower (frozen or trainable) and a size embedder, both
    dropped for CFG half the time, so the ucg masks matter."""
    config = mnist_cond.get_config()
    text = P.embedder("FrozenCLIPEmbedder", "txt", always_return_pooled=True, width=WIDTH, layers=1, heads=2,
                      max_length=8)
    text.update(is_trainable=not frozen_text, ucg_rate=0.5)
    size = {**P.size_embedder("original_size_as_tuple", SIZE_DIM), "ucg_rate": 0.5}
    network = P.unet(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=1,
                     channel_mult=[1], num_head_channels=16, num_classes="sequential", transformer_depth=1,
                     adm_in_channels=WIDTH + 2 * SIZE_DIM, context_dim=WIDTH)
    first_stage = P.autoencoder_kl(P.ddconfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32))
    first_stage["params"]["ckpt_path"] = ""
    model = P.engine(network, P.discrete_denoiser("EpsScaling"), P.conditioner(text, size), first_stage, 0.5)
    model["base_learning_rate"] = 1e-3
    model["params"].update(loss_fn_config=T.eps_loss(), sampler_config=T.euler_sampler(2, 3.0), ckpt_path=ckpt)
    config.model = model
    config.data = T.streaming_data(T.image_datapipeline(32, urls, shuffle=4), batch_size=4, num_workers=0)
    config.training.update(name="tiny_preencode", max_steps=2, checkpoint_every=1000, sample_every=0, log_every=1,
                           num_samples=2, sample_nrow=2, sample_classes=(), sample_prompts=("a red bicycle",),
                           tokenizer=str(BPE), report_flops=False)
    return config


def random_batch(engine, n: int = 4) -> dict:
    from sgm_jax.nn.conditioner import text_tokenizers, tokenize_batch
    from sgm_jax.nn.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    batch = {"jpg": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
             "txt": np.asarray([f"a photo of thing {i}" for i in range(n)]),
             "original_size_as_tuple": rng.integers(32, 512, (n, 2)).astype(np.int32)}
    return tokenize_batch(engine.conditioner, batch, text_tokenizers(engine.conditioner, load_tokenizer(str(BPE))))


def full_params(engine, batch) -> dict:
    params = dict(engine.init_params(jax.random.key(1), batch))
    params["first_stage"] = engine.first_stage.init(jax.random.key(2), batch["jpg"][:1])["params"]
    return params


@pytest.mark.parametrize("frozen_text", [True, False], ids=["frozen_text", "trainable_text"])
def test_preencoded_loss_equals_raw_loss(frozen_text):
    from sgm_jax.checkpointing.frozen import split_params
    from sgm_jax.data.preencoded import MOMENTS_KEY, embedding_key
    from sgm_jax.engine import build_engine
    from sgm_jax.nn.conditioner import token_key
    from sgm_jax.training.preencode import make_encoder, stored_embedders

    engine = build_engine(tiny_config(frozen_text).model)
    batch = random_batch(engine)
    params = full_params(engine, batch)
    _, frozen = split_params(engine, params)
    stored = stored_embedders(engine, frozen)
    assert stored == ((0,) if frozen_text else ())  # the size embedder has no weights: its input passes through
    encoded = jax.jit(make_encoder(engine, stored, np.float32))(frozen, batch)
    pre = {k: v for k, v in batch.items() if k != "jpg"} | encoded
    assert encoded[MOMENTS_KEY].shape == (4, 16, 16, 8)
    if frozen_text:  # the tower's outputs replace its tokens: without them a computed path would fail
        assert encoded[embedding_key(0, 0)].shape == (4, 8, WIDTH) and encoded[embedding_key(0, 1)].shape == (4, WIDTH)
        del pre[token_key("txt", 0)]
    loss = jax.jit(lambda p, b, k: engine.loss(p, b, k)[1])
    for seed in range(3):  # ucg rate 0.5: the drop masks differ between keys and must agree between paths
        key = jax.random.key(seed)
        np.testing.assert_allclose(loss(params, pre, key), loss(params, batch, key), rtol=2e-5, atol=1e-6)
    if frozen_text:  # --dtype float16 shards: the same loss up to float16 rounding of what is stored
        half = {**pre, **jax.jit(make_encoder(engine, stored, np.float16))(frozen, batch)}
        assert half[MOMENTS_KEY].dtype == np.float16
        np.testing.assert_allclose(loss(params, half, key), loss(params, batch, key), rtol=1e-2, atol=1e-3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Raw captioned tar shards of scikit-image photographs and a converted checkpoint of the
    frozen-text tiny model (random weights, the layout convert_torch_weights.py writes)."""
    from test_latent_training import captioned_photos

    from sgm_jax.convert.params_dir import save_params
    from sgm_jax.data.prepare import prepare
    from sgm_jax.engine import build_engine

    tmp = tmp_path_factory.mktemp("preencode")
    shards = prepare(str(captioned_photos(tmp / "photos")), str(tmp / "raw"), samples_per_shard=3, progress=False)
    engine = build_engine(tiny_config(True).model)
    save_params(jax.device_get(full_params(engine, random_batch(engine))), tmp / "ckpt")
    return tmp, shards["urls"], str(tmp / "ckpt")


def test_cli_writes_shards_and_training_from_them_samples(prepared, capsys):
    from sgm_jax.cli.preencode import main
    from sgm_jax.data import from_config
    from sgm_jax.data.preencoded import MOMENTS_KEY, embedding_key
    from sgm_jax.inference.workdir import load_trained
    from sgm_jax.training.diffusion_task import make_sample_fn
    from sgm_jax.training.loop import train

    tmp, urls, ckpt = prepared
    config_file = tmp / "tiny_config.py"
    config_file.write_text("from test_preencode import tiny_config\n\n\ndef get_config():\n"
                           "    return tiny_config(True)\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config_file), "--out", str(tmp / "pre"), "--samples-per-shard", "5",
              f"--config.model.params.ckpt_path={ckpt}", f"--config.data.params.train.datapipeline.urls={urls}"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert "wrote 8 samples in 2 shards" in out and "datapipeline.preencoded=True" in out
    pre_urls = out.split("urls='")[1].split("'")[0]

    config = tiny_config(True, pre_urls, ckpt)
    config.data.params.train.datapipeline.preencoded = True
    dataset = from_config(config.data)
    assert dataset.image_shape == (32, 32, 3)
    batch = dataset.example_batch(4)
    assert "jpg" not in batch and batch[MOMENTS_KEY].shape == (4, 16, 16, 8)
    assert batch[embedding_key(0, 0)].shape == (4, 8, WIDTH) and batch["txt"].shape == (4,)
    assert batch["original_size_as_tuple"].dtype == np.int32
    with pytest.raises(UserError, match="is pre-encoded: set datapipeline.preencoded=True"):
        from_config(tiny_config(True, pre_urls, ckpt).data).example_batch(1)

    config.training.update(sample_every=2, checkpoint_every=2)
    summary = train(config, tmp / "work")
    assert summary["step"] == 2 and Path(summary["samples"]).is_file()  # the grid: prompts through the frozen tower
    # the checkpoint, restored as sample.py does (frozen parts from the config), samples a prompt
    _, engine, params, run = load_trained(tmp / "work")
    assert run["image_shape"] == [32, 32, 3]
    prompt = random_batch(engine, 1)
    del prompt["jpg"]
    images = make_sample_fn(engine, engine.latent_shape((1, 32, 32, 3)))(params, prompt, jax.random.key(0))
    assert images.shape == (1, 32, 32, 3) and bool(np.isfinite(images).all())


def test_bad_input_is_one_line(prepared, capsys):
    from sgm_jax.cli.preencode import main
    from sgm_jax.data import from_config
    from sgm_jax.training.preencode import preencode

    tmp, urls, ckpt = prepared
    config = tiny_config(True, urls, ckpt)
    del config.model.params["first_stage_config"]
    with pytest.raises(UserError, match="has no first stage"):
        preencode(config, tmp / "none")
    with pytest.raises(UserError, match="frozen .* has no weights"):  # nothing loaded to encode with
        preencode(tiny_config(True, urls), tmp / "none")
    raw_as_pre = tiny_config(True, urls, ckpt)
    raw_as_pre.data.params.train.datapipeline.preencoded = True
    with pytest.raises(UserError, match="has no first_stage_moments.npy"):
        from_config(raw_as_pre.data).example_batch(2)
    legacy = tiny_config(True, urls, ckpt)
    legacy.model.params.conditioner_config.params.emb_models[0]["legacy_ucg_value"] = ""
    with pytest.raises(UserError, match="embedder 0 .*legacy_ucg_value"):
        preencode(legacy, tmp / "none")

    with pytest.raises(SystemExit) as exit_:
        main(["--config", "mnist_cond_cpu", "--out", str(tmp / "none")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_failed_overwrite_keeps_the_earlier_shards(prepared, monkeypatch):
    from sgm_jax.training import preencode as E

    tmp, urls, ckpt = prepared
    config = tiny_config(True, urls, ckpt)
    first = E.preencode(config, tmp / "kept", samples_per_shard=5, progress=False)
    before = {p: Path(p).read_bytes() for p in first["paths"]}
    with pytest.raises(UserError, match="already holds"):
        E.preencode(config, tmp / "kept", progress=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(E.P, "encode_sample", fail)
    with pytest.raises(OSError, match="disk full"):
        E.preencode(config, tmp / "kept", samples_per_shard=5, overwrite=True, progress=False)
    assert {p: Path(p).read_bytes() for p in first["paths"]} == before
    assert sorted(x.name for x in (tmp / "kept").iterdir()) == ["preencoded-000000.tar", "preencoded-000001.tar",
                                                                 "preencoded.json"]


def test_sample_format_round_trip():
    """encode_sample -> tar bytes -> decode_sample -> collate keeps names, shapes and dtypes."""
    from sgm_jax.data import preencoded as P
    from sgm_jax.data.transforms import BadSample

    moments = np.arange(2 * 2 * 8, dtype=np.float16).reshape(2, 2, 8)
    fields = {P.MOMENTS_KEY: moments, P.embedding_key(0, 0): np.ones((3, 4), np.float32), "txt": "a cat",
              "cls": 7, "original_size_as_tuple": np.asarray([480, 640], np.int32)}
    sample = P.encode_sample("000000001", fields, (16, 16, 3), source="x")
    raw = {k: v.encode() if isinstance(v, str) else v for k, v in sample.items()}
    decoded = P.decode_sample(raw, ("jpg", "txt"))
    assert decoded["__image_shape__"] == (16, 16, 3) and decoded["txt"] == "a cat" and decoded["cls"] == 7
    batch = P.collate([decoded, decoded])
    assert batch[P.MOMENTS_KEY].dtype == np.float16 and batch[P.MOMENTS_KEY].shape == (2, 2, 2, 8)
    assert batch["original_size_as_tuple"].tolist() == [[480, 640]] * 2 and batch["cls"].dtype == np.int32
    with pytest.raises(BadSample):
        P.decode_sample(raw, ("jpg", "cls", "caption"))
    with pytest.raises(UserError, match="has no first_stage_moments.npy"):
        P.decode_sample({"jpg": b"", "__key__": "k"}, ("jpg",))
