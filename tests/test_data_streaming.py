"""Streaming input pipeline: tar shards built here from real MNIST digits and scikit-image's
photographs; the seed's transforms against hand-computed values; hosts; exact resume; bad data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgm_jax.data import from_config
from sgm_jax.data import transforms as T
from sgm_jax.data import webdataset as W
from sgm_jax.data.mnist import find_idx_files, read_idx
from sgm_jax.errors import UserError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
NAMES = "zero one two three four five six seven eight nine".split()
TO_TENSOR_RESCALE = [{"target": "sdata.mappers.TorchVisionImageTransforms",
                      "params": {"key": "jpg", "transforms": [{"target": "torchvision.transforms.ToTensor"}]}},
                     {"target": "sdata.mappers.Rescaler"}]


def seed_postprocessors(size: int, crop: str = "random") -> list[dict]:
    """The seed's txt2img-clipl.yaml postprocessors (crop: our centre option)."""
    add = {"target": "sdata.mappers.AddOriginalImageSizeAsTupleAndCropToSquare",
           "params": {"h_key": "height", "w_key": "width", **({"crop": crop} if crop != "random" else {})}}
    return [{"target": "sdata.mappers.TorchVisionImageTransforms", "params": {"key": "jpg", "transforms": [
        {"target": "torchvision.transforms.Resize", "params": {"size": size, "interpolation": 3}},
        {"target": "torchvision.transforms.ToTensor"}]}},
            {"target": "sdata.mappers.Rescaler"}, add]


def stream_config(urls, batch_size=8, workers=0, postprocessors=TO_TENSOR_RESCALE, decoders=("l8",), **pipeline):
    pc = {"shardshuffle": 100, "sample_shuffle": 0, "required_keys": ["jpg", "txt", "cls"], **pipeline}
    return {"target": "sgm.data.dataset.StableDataModuleFromConfig", "params": {"train": {
        "datapipeline": {"urls": urls, "pipeline_config": pc, "decoders": list(decoders),
                         "postprocessors": postprocessors},
        "loader": {"batch_size": batch_size, "num_workers": workers}}}}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mnist_digits():
    if find_idx_files(MNIST_DIR, "train") is None:
        pytest.skip(f"real MNIST IDX files not found in {MNIST_DIR}")
    images = read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz")[:96]
    labels = read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")[:96].astype(int)
    assert len({im.tobytes() for im in images}) == 96  # every digit tells itself apart
    return images, labels


@pytest.fixture(scope="module")
def mnist_shards(mnist_digits, tmp_path_factory):
    """8 shards of 12 real digits each, captioned 'a handwritten digit seven'."""
    images, labels = mnist_digits
    out = tmp_path_factory.mktemp("mnist_shards")
    samples = [{"__key__": f"{i:06d}", "png": _png(im), "txt": f"a handwritten digit {NAMES[l]}", "cls": str(l)}
               for i, (im, l) in enumerate(zip(images, labels))]
    W.write_tar_shards(iter(samples), str(out / "mnist-%06d.tar"), 12)
    return str(out / "mnist-{000000..000007}.tar")


def _digit_ids(batch, images):
    """Index of each batch image among the source digits (pixels decoded and rescaled back)."""
    table = {im.tobytes(): i for i, im in enumerate(images)}
    pixels = np.rint((batch["jpg"][..., 0] + 1) / 2 * 255).astype(np.uint8)
    return [table[p.tobytes()] for p in pixels]


def test_pattern_expansion_and_clear_errors(mnist_shards, tmp_path):
    assert W.expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert W.expand_braces("{x,y}/s-{1..2}.tar") == ["x/s-1.tar", "x/s-2.tar", "y/s-1.tar", "y/s-2.tar"]
    shards = W.expand_urls([mnist_shards])
    assert len(shards) == 8 and shards[3].endswith("mnist-000003.tar")
    assert W.expand_urls(str(Path(shards[0]).parent / "*.tar")) == shards == W.expand_urls(str(Path(shards[0]).parent))
    for urls in ([str(tmp_path / "none-{000..003}.tar")], [str(tmp_path / "*.tar")], []):
        with pytest.raises(UserError) as e:
            from_config(stream_config(urls), process_index=0, process_count=1)
        assert "\n" not in str(e.value)


def test_seed_transforms_against_hand_computed_values():
    skdata = pytest.importorskip("skimage.data")
    coffee = skdata.coffee()  # 400 x 600 photograph
    assert coffee.shape == (400, 600, 3)
    raw = {"__key__": "c", "jpg": _png(coffee), "txt": b"a cup of coffee", "json": b'{"height": 1200, "width": 1800}'}
    steps = T.build_steps(seed_postprocessors(256))
    out = T.apply_steps(T.decode(raw, "RGB", ("jpg", "txt")), steps, T.sample_rng(7, (0, 3, 512)))
    # Resize(256): shorter side 400 -> 256, longer int(256 * 600 / 400) = 384; square crop: top 0, left in [0, 128]
    top, left = out["crop_coords_top_left"]
    assert top == 0 and 0 <= left <= 128 and out["jpg"].shape == (256, 256, 3)
    resized = np.asarray(Image.fromarray(coffee).resize((384, 256), Image.BICUBIC), np.float32)
    np.testing.assert_array_equal(out["jpg"], resized[:, left:left + 256] / np.float32(255) * 2 - 1)
    assert out["original_size_as_tuple"].tolist() == [1200, 1800]  # the json's, as the seed reads it
    assert out["target_size_as_tuple"].tolist() == [256, 256] and out["txt"] == "a cup of coffee"
    again = T.apply_steps(T.decode(raw, "RGB"), steps, T.sample_rng(7, (0, 3, 512)))
    assert again["crop_coords_top_left"].tolist() == [top, left]  # a function of (seed, identity)
    lefts = {int(T.apply_steps(T.decode(raw), steps, T.sample_rng(7, (e, 3, 512)))["crop_coords_top_left"][1])
             for e in range(6)}
    assert len(lefts) > 1  # another epoch, another crop

    # portrait (the photo transposed, no json): 600 x 400 -> 384 x 256, crop rows, original = decoded size
    portrait = np.ascontiguousarray(coffee.transpose(1, 0, 2))
    out = T.apply_steps(T.decode({"jpg": _png(portrait)}), T.build_steps(seed_postprocessors(256, "center")),
                        T.sample_rng(0, (0,)))
    assert out["original_size_as_tuple"].tolist() == [600, 400] and out["crop_coords_top_left"].tolist() == [64, 0]
    # torchvision's CenterCrop rounds half to even: (383 - 256) / 2 = 63.5 -> 64, (385 - 256) / 2 = 64.5 -> 64
    assert T.center_crop_origin(383, 256, 256, 256) == (64, 0) and T.center_crop_origin(256, 385, 256, 256) == (0, 64)
    assert T.shorter_side_size(427, 640, 256) == (256, 383)  # rocket: int(256 * 640 / 427) = int(383.7)

    chelsea = skdata.chelsea()  # 300 x 451
    flip = T.build_steps([{"target": "sdata.mappers.TorchVisionImageTransforms", "params": {"transforms": [
        {"target": "torchvision.transforms.CenterCrop", "params": {"size": [300, 450]}},
        {"target": "torchvision.transforms.RandomHorizontalFlip", "params": {"p": 1.0}},
        {"target": "torchvision.transforms.ToTensor"}]}}, {"target": "sdata.mappers.Rescaler"}])
    out = T.apply_steps(T.decode({"png": _png(chelsea)}), flip, T.sample_rng(0, (0,)))
    # (451 - 450) / 2 = 0.5 rounds to 0: columns 0..449, mirrored; uint8 0 -> -1, 255 -> 1
    np.testing.assert_array_equal(out["jpg"], chelsea[:, 449::-1].astype(np.float32) / np.float32(255) * 2 - 1)
    assert out["target_size_as_tuple"].tolist() == [300, 450]


def test_aspect_buckets_one_shape_per_batch_and_resume(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    photos = {"coffee": skdata.coffee(), "astronaut": skdata.astronaut(), "rocket": skdata.rocket(),
              "chelsea": skdata.chelsea(), "camera": np.stack([skdata.camera()] * 3, -1)}
    samples = [{"__key__": f"{name}{r}", "jpg": _jpeg(img), "txt": f"a photo: {name}"}
               for r in range(3) for name, img in photos.items()]
    W.write_tar_shards(iter(samples), str(tmp_path / "photos-%02d.tar"), 5)
    buckets = [[32, 32], [24, 40]]
    config = stream_config(str(tmp_path / "photos-{00..02}.tar"), batch_size=2, decoders=("pil",),
                           postprocessors=seed_postprocessors(32), aspect_buckets=buckets, sample_shuffle=4,
                           required_keys=["jpg", "txt"])
    ds = from_config(config, process_index=0, process_count=1)
    assert ds.image_shape == (32, 32, 3) and ds.steps_per_epoch(2) is None
    it = ds.iterator(2, seed=1)
    batches = [next(it) for _ in range(12)]
    for b in batches:
        h, w = b["jpg"].shape[1:3]
        assert [h, w] in buckets and b["target_size_as_tuple"].tolist() == [[h, w]] * 2
        for caption, original, (top, left) in zip(b["txt"], b["original_size_as_tuple"], b["crop_coords_top_left"]):
            name = caption.split(": ")[1]
            assert original.tolist() == list(photos[name].shape[:2])
            # 3:2 photos go to the 24 x 40 bucket, covered at 27 x 40 (scale 40 / 600); squares to 32 x 32
            expect_bucket = [24, 40] if name in ("coffee", "rocket", "chelsea") else [32, 32]
            assert [h, w] == expect_bucket
            cover = T.cover_size(*original.tolist(), h, w)
            assert 0 <= top <= cover[0] - h and 0 <= left <= cover[1] - w
    it = ds.iterator(2, seed=1)
    states = []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))
        next(it)
    # resume where a sample waits in a bucket (its identity is in the state, read again on restore)
    k = next(i for i, st in enumerate(states) if st["grain"]["pending"])
    resumed = ds.iterator(2, seed=1)
    resumed.set_state(states[k])
    for b in batches[k:]:
        got = next(resumed)
        assert list(got["txt"]) == list(b["txt"])
        np.testing.assert_array_equal(got["jpg"], b["jpg"])
        np.testing.assert_array_equal(got["crop_coords_top_left"], b["crop_coords_top_left"])


def test_two_hosts_read_disjoint_shards_covering_the_data(mnist_shards, mnist_digits):
    images, labels = mnist_digits
    seen = []
    for host in (0, 1):
        ds = from_config(stream_config(mnist_shards, batch_size=8), process_index=host, process_count=2)
        it = ds.iterator(8, seed=3)
        ids = [i for _ in range(12) for i in _digit_ids(next(it), images)]  # 48 = the host's 4 shards
        # host p reads shards p, p + 2, ...: digits 12 * shard .. 12 * shard + 11
        assert sorted({i // 12 for i in ids}) == list(range(host, 8, 2))
        seen.append(ids)
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(96))
    batch = from_config(stream_config(mnist_shards, batch_size=8), process_index=0, process_count=2).example_batch(3)
    assert list(batch["txt"]) == [f"a handwritten digit {NAMES[l]}" for l in labels[:3]]
    assert batch["cls"].tolist() == labels[:3].tolist() and batch["jpg"].shape == (3, 28, 28, 1)


def _run(ds, seed, n, state_at=None):
    it = ds.iterator(ds.batch_size, seed=seed)
    out, state = [], None
    for i in range(n):
        if i == state_at:
            state = json.loads(json.dumps(it.get_state()))
        out.append(next(it))
    it.close()
    return out, state


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_uninterrupted_batches(mnist_shards, mnist_digits, workers):
    images, _ = mnist_digits
    ds = from_config(stream_config(mnist_shards, batch_size=8, workers=workers, sample_shuffle=6),
                     process_index=0, process_count=1)
    n, k = 16, 7  # 12 batches per epoch: the resumed part crosses into epoch 2
    full, state = _run(ds, 11, n, state_at=k)
    ids = [_digit_ids(b, images) for b in full]
    assert sorted(i for b in ids[:12] for i in b) == list(range(96))  # an epoch is a permutation
    assert ids[:12] != [list(range(8 * s, 8 * s + 8)) for s in range(12)]  # and shuffled
    resumed = ds.iterator(8, seed=11, start_step=k)
    resumed.set_state(state)
    for b in full[k:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["jpg"], b["jpg"])
        assert list(got["txt"]) == list(b["txt"]) and got["cls"].tolist() == b["cls"].tolist()
    resumed.close()
    if workers == 0:
        replayed = ds.iterator(8, seed=11, start_step=k)  # no saved state: replays k batches
        np.testing.assert_array_equal(next(replayed)["jpg"], full[k]["jpg"])
        other, _ = _run(ds, 12, 1)
        assert not np.array_equal(other[0]["jpg"], full[0]["jpg"])


def test_bad_samples_are_skipped_counted_or_fatal(mnist_digits, tmp_path):
    images, labels = mnist_digits
    good = [{"__key__": f"{i:04d}", "png": _png(images[i]), "txt": f"a handwritten digit {NAMES[labels[i]]}",
             "cls": str(labels[i])} for i in range(12)]
    broken = dict(good[3], png=b"\x89PNG\r\n\x1a\n not an image")   # undecodable
    uncaptioned = {k: v for k, v in good[5].items() if k != "txt"}  # no caption
    W.write_tar_shards(iter(good[:3] + [broken, good[4], uncaptioned]), str(tmp_path / "bad-%d.tar"), 6)
    W.write_tar_shards(iter(good[6:]), str(tmp_path / "cut-%d.tar"), 6)
    cut = tmp_path / "cut-0.tar"
    cut.write_bytes(cut.read_bytes()[:3 * 1024 + 700])  # inside the second sample's image member
    urls = [str(tmp_path / "bad-0.tar"), str(cut)]
    ds = from_config(stream_config(urls, batch_size=2, shardshuffle=0), process_index=0, process_count=1)
    it = ds.iterator(2, seed=0)
    ids = [i for _ in range(3) for i in _digit_ids(next(it), images)]
    # per epoch: 4 good digits from bad-0.tar, 1 from the cut shard (the cut sample and the rest lost)
    assert sorted(ids[:5]) == [0, 1, 2, 4, 6]
    stats = it.stats()
    assert stats["undecodable_image"] == 1 and stats["missing_txt"] == 1 and stats["truncated_shards"] == 1
    assert stats["skipped_samples"] == 2
    strict = from_config(stream_config(urls, batch_size=2, shardshuffle=0, skip_bad_samples=False),
                         process_index=0, process_count=1)
    strict_it = strict.iterator(2, seed=0)
    assert _digit_ids(next(strict_it), images) == [0, 1]
    with pytest.raises(UserError, match="bad sample 0003 in .*bad-0.tar: undecodable image") as e:
        next(strict_it)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"\0" * 1024)  # a well-formed archive without members
    with pytest.raises(UserError, match="no complete sample"):
        next(from_config(stream_config([str(empty)], batch_size=2), process_index=0, process_count=1).iterator(2))


def test_array_record_source_matches_the_tar_shards(mnist_shards, mnist_digits, tmp_path):
    from sgm_jax.data.prepare import write_array_records

    images, labels = mnist_digits
    samples = [s for url in W.expand_urls([mnist_shards]) for s in W.shard_samples(url)]
    write_array_records(iter(samples), str(tmp_path / "mnist-%02d.array_record"), 48)
    config = stream_config(str(tmp_path / "mnist-*.array_record"), batch_size=8)
    hosts = [from_config(config, process_index=p, process_count=2) for p in (0, 1)]
    assert hosts[0].source.describe().startswith("arrayrecord from array_record: 2 ArrayRecord files")
    seen = [[i for b in _run(h, 2, 12)[0] for i in _digit_ids(b, images)] for h in hosts]
    # host p of 2 reads records p, p + 2, ...: 12 batches of 4 (its half of 8) = its 48, shuffled
    assert sorted(seen[0]) == list(range(0, 96, 2)) and sorted(seen[1]) == list(range(1, 96, 2))
    assert seen[0] != sorted(seen[0])
    assert hosts[0].example_batch(4)["cls"].tolist() == labels[:4].tolist()
    full, state = _run(hosts[0], 2, 10, state_at=4)
    resumed = hosts[0].iterator(8, seed=2)
    resumed.set_state(state)
    assert [_digit_ids(next(resumed), images) for _ in range(6)] == [_digit_ids(b, images) for b in full[4:]]


def test_training_from_tar_shards_resumes_bit_identically(mnist_shards, tmp_path):
    """A toy config trained from tar shards through config.data alone: 4 steps in one go vs
    2 + a resumed 2 (the data position restored from the checkpoint) -> identical weights."""
    import chex

    from sgm_jax.configs import mnist_cond, mnist_cond_tar
    from sgm_jax.inference.workdir import load_trained
    from sgm_jax.training.loop import train

    def config(max_steps):
        c = mnist_cond_tar.get_config()
        c.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1], num_head_channels=32)
        params = c.model.params.to_dict()
        params.pop("sampler_config")  # no sample grids: this test is about the data and the weights
        c.model.params = {**params, "use_ema": False}
        c.data.params.train.datapipeline = mnist_cond_tar.datapipeline(mnist_shards, sample_shuffle=6)
        c.data.params.train.loader.batch_size = 8
        c.training.update(max_steps=max_steps, log_every=2, checkpoint_every=1000, sample_every=0, warmup_steps=0)
        return c

    full = train(config(4), tmp_path / "full")
    assert full["step"] == 4 and full["data"].startswith("webdataset from tar: 8 shards")
    assert train(config(2), tmp_path / "resumed")["step"] == 2
    assert train(config(4), tmp_path / "resumed")["step"] == 4
    p_full = load_trained(tmp_path / "full", use_ema=False)[2]
    p_resumed = load_trained(tmp_path / "resumed", use_ema=False)[2]
    chex.assert_trees_all_equal(p_full, p_resumed)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("data/skipped_samples") == 0.0 for row in rows)


def test_tfds_data_source(mnist_digits, tmp_path):
    """A tfds data set prepared here as ArrayRecord (no TensorFlow), read with tfds.data_source."""
    tfds = pytest.importorskip("tensorflow_datasets")
    images, labels = mnist_digits

    class SgmJaxTestDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(32):
                yield i, {"image": images[i][..., None], "label": int(labels[i])}

    SgmJaxTestDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = stream_config("tfds:sgm_jax_test_digits", batch_size=8, required_keys=["jpg", "cls"])
    config["params"]["train"]["datapipeline"]["tfds_data_dir"] = str(tmp_path)
    ds = from_config(config, process_index=0, process_count=1)
    assert ds.source.describe() == "sgm_jax_test_digits from tfds: tfds sgm_jax_test_digits[train] (32 examples)"
    batches, state = _run(ds, 4, 6, state_at=2)
    ids = [i for b in batches[:4] for i in _digit_ids(b, images)]
    assert sorted(ids) == list(range(32))  # one epoch: every digit once
    for b in batches:
        assert b["cls"].tolist() == labels[_digit_ids(b, images)].tolist()  # labels travel with their images
    resumed = ds.iterator(8, seed=4)
    resumed.set_state(state)
    assert [_digit_ids(next(resumed), images) for _ in range(4)] == [_digit_ids(b, images) for b in batches[2:]]
    with pytest.raises(UserError, match="not prepared"):
        from_config(stream_config("tfds:no_such_set_here"), process_index=0, process_count=1)


def test_config_errors_are_one_line(mnist_shards):
    bad = [dict(postprocessors=[{"target": "sdata.mappers.Unknown"}]),
           dict(postprocessors=TO_TENSOR_RESCALE, aspect_buckets=[[32, 32]]),
           dict(decoders=("cmyk",))]
    for kwargs in bad:
        with pytest.raises((UserError, ValueError)) as e:
            from_config(stream_config(mnist_shards, **kwargs), process_index=0, process_count=1)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="divisible by 3 hosts"):
        from_config(stream_config(mnist_shards, batch_size=8), process_index=0, process_count=3)


def test_an_image_of_another_size_is_a_bad_sample_not_a_shape_error(tmp_path, caplog):
    """A 1x1 image among 8x8 ones (first in the file, even): skipped, named and counted, or fatal by flag."""
    levels = [10, 40, 70, 100, 130, 160, 190]
    samples = [{"__key__": "tiny", "png": _png(np.full((1, 1), 255, np.uint8)), "txt": "a dot", "cls": "1"}]
    samples += [{"__key__": f"{v:04d}", "png": _png(np.full((8, 8), v, np.uint8)), "txt": "grey", "cls": "0"}
                for v in levels]
    W.write_tar_shards(iter(samples), str(tmp_path / "mixed-%d.tar"), 8)
    urls = [str(tmp_path / "mixed-0.tar")]
    ds = from_config(stream_config(urls, batch_size=7, shardshuffle=0), process_index=0, process_count=1)
    assert ds.image_shape == (8, 8, 1)
    it = ds.iterator(7, seed=0)
    with caplog.at_level("WARNING"):
        batch = next(it)
    assert batch["jpg"].shape == (7, 8, 8, 1)
    assert sorted(np.rint((batch["jpg"][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()) == levels
    assert it.stats()["wrong_size"] == 1 and it.stats()["skipped_samples"] == 1
    assert f"skipping bad sample tiny in {urls[0]}: 1x1 image after the postprocessors, but the model trains on " \
           "8x8 (resize / crop all images to one size) (counted as data/wrong_size)" in caplog.text
    strict = from_config(stream_config(urls, batch_size=7, shardshuffle=0, skip_bad_samples=False),
                         process_index=0, process_count=1)
    with pytest.raises(UserError, match="^bad sample tiny in .*mixed-0.tar: 1x1 image after the postprocessors, "
                                        "but the model trains on 8x8") as e:
        next(strict.iterator(7, seed=0))
    assert "\n" not in str(e.value)
