"""Several hosts for the latent models and the evaluator: a tiny SDXL fine-tune with FSDP over
2 processes x 2 CPU devices (saves, resumes, then samples through sample.py on one process), and
evaluate.py's FID over 2 processes against 1 (see hosts.py for how the processes are joined)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO
from hosts import Job, shared_folder

BPE = REPO.parent / "shared" / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def sdxl_inputs(tmp_path_factory):
    if not BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary {BPE} absent (../shared/data/clip)")
    from sgm_jax.cli.configs import load_config
    from sgm_jax.data.prepare import prepare
    from test_inference import convert_cli, write_random_checkpoint
    from test_latent_training import captioned_photos

    with shared_folder(tmp_path_factory, "sdxl_hosts") as (tmp, fresh):  # once for the workers of this session
        if fresh:
            micro = REPO / "tests" / "configs" / "micro_sdxl.py"
            convert_cli(micro, write_random_checkpoint(load_config(str(micro)), tmp / "micro.safetensors", seed=5),
                        tmp / "converted")
            prepare(str(captioned_photos(tmp / "photos")), str(tmp / "shards"), samples_per_shard=4, progress=False)
    return tmp, tmp / "converted", str(tmp / "shards" / "data-{000000..000001}.tar")


def test_sdxl_finetune_with_fsdp_over_two_hosts_resumes_and_samples(sdxl_inputs, monkeypatch):
    tmp, converted, urls = sdxl_inputs
    monkeypatch.setenv("SGM_JAX_CLIP_BPE", str(BPE))
    workdir = tmp / "workdir"
    argv = ["train.py", "--config", "tests/configs/tiny_sdxl_finetune.py", "--workdir", str(workdir),
            f"--config.model.params.ckpt_path={converted}", f"--config.data.params.train.datapipeline.urls={urls}"]
    with Job(argv, n=2, devices=2, logs=tmp / "logs_first") as job:
        assert job.wait(600) == [0, 0], job.tail()
    state = workdir / "checkpoints" / "2" / "state"
    # FSDP over 4 devices of 2 hosts: each host wrote its own shards of the UNet
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    with Job([*argv, "--config.training.max_steps=4"], n=2, devices=2, logs=tmp / "logs_resume") as job:
        assert job.wait(600) == [0, 0], job.tail()
    assert f"resumed from {workdir / 'checkpoints'}/2" in job.stdout(0)
    assert json.loads(job.stdout(0).strip().splitlines()[-1])["step"] == 4
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # the 2-host workdir samples on one process, one device
    out = tmp / "samples"
    with Job(["sample.py", "--workdir", str(workdir), "--prompt", "a tabby cat looking left", "--num", "2",
              "--steps", "2", "--seed", "3", "--out", str(out)], n=1, devices=1, logs=tmp / "logs_sample") as job:
        assert job.wait(300) == [0], job.tail()
    from PIL import Image

    images = [np.asarray(Image.open(f)) for f in sorted(out.glob("*.png"))]
    assert len(images) == 2 and all(x.shape == (64, 64, 3) and x.std() > 0 for x in images)


def test_fid_over_two_hosts_equals_one(tmp_path):
    from sgm_jax.convert.files import save_safetensors
    from sgm_jax.convert.inception import export_inception
    from sgm_jax.data.mnist import find_idx_files, read_idx
    from sgm_jax.evaluation.images import save_image_folder
    from sgm_jax.nn.inception import random_inception_params

    files = find_idx_files(REPO.parent / "shared" / "data" / "mnist")
    if files is None:
        pytest.skip("MNIST is not present in ../shared/data/mnist")
    digits = read_idx(files[0])[:26, :, :, None]
    save_image_folder(tmp_path / "ref", digits[:8])
    save_image_folder(tmp_path / "gen", digits[8:])  # 18 images: 9 per host
    weights = save_safetensors(export_inception(random_inception_params(0)), tmp_path / "inception.safetensors")
    reports = {}
    for hosts in (2, 1):
        out = tmp_path / f"fid_{hosts}.json"
        argv = ["evaluate.py", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"), "--metrics", "fid",
                "--inception-weights", str(weights), "--batch-size", "4", "--out", str(out)]
        with Job(argv, n=hosts, devices=4 // hosts, logs=tmp_path / f"logs_{hosts}") as job:
            assert job.wait(400) == [0] * hosts, job.tail()
        reports[hosts] = json.loads(out.read_text())["metrics"]
    assert reports[2]["num_images"] == reports[1]["num_images"] == 18
    assert reports[1]["fid"] > 0
    np.testing.assert_allclose(reports[2]["fid"], reports[1]["fid"], rtol=1e-5)


def test_preencode_over_two_hosts_splits_the_shards(sdxl_inputs):
    from sgm_jax.data import preencoded as P
    from sgm_jax.data import webdataset as W

    tmp, converted, urls = sdxl_inputs
    encoded = {}
    for hosts in (2, 1):
        out = tmp / f"pre_{hosts}"
        argv = ["-m", "sgm_jax.cli.preencode", "--config", "tests/configs/tiny_sdxl_finetune.py", "--out", str(out),
                f"--config.model.params.ckpt_path={converted}", f"--config.data.params.train.datapipeline.urls={urls}"]
        with Job(argv, n=hosts, devices=4 // hosts, logs=tmp / f"logs_pre_{hosts}") as job:
            assert job.wait(400) == [0] * hosts, job.tail()
        assert "wrote 8 samples" in job.stdout(0)
        files = sorted(p.name for p in out.glob("preencoded-*.tar"))
        if hosts == 2:  # each host encoded its own raw shard (2 shards of 4 photos) into its own file
            assert files == ["preencoded-host000-000000.tar", "preencoded-host001-000000.tar"], files
        samples = [s for f in sorted(out.glob("preencoded-*.tar")) for s in W.shard_samples(str(f))]
        encoded[hosts] = {json.loads(s["json"])["source"]: P.decode_sample(s, ("txt",)) for s in samples}
    assert sorted(encoded[2]) == sorted(encoded[1]) and len(encoded[1]) == 8
    for source, sample in encoded[1].items():  # the same moments, whichever host encoded the image
        np.testing.assert_allclose(encoded[2][source][P.MOMENTS_KEY], sample[P.MOMENTS_KEY], rtol=1e-4, atol=1e-5)
