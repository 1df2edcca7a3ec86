"""A resumed run notices shards replaced under the same names (size / modification time in run.json)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sgm_jax.data import webdataset as W
from sgm_jax.errors import UserError


def _shards(folder, value: int) -> list[str]:
    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    samples = [{"__key__": f"{i:04d}", "png": png(value + i), "cls": str(i % 10)} for i in range(8)]
    return W.write_tar_shards(iter(samples), str(folder / "data-%06d.tar"), 4)


def _config(urls: str, max_steps: int):
    from sgm_jax.configs import mnist_cond, mnist_cond_tar

    c = mnist_cond_tar.get_config()
    c.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1], num_head_channels=32)
    params = c.model.params.to_dict()
    params.pop("sampler_config")
    c.model.params = {**params, "use_ema": False}
    c.data.params.train.datapipeline = mnist_cond_tar.datapipeline(urls, sample_shuffle=0)
    c.data.params.train.loader.batch_size = 4
    c.training.update(max_steps=max_steps, log_every=1, checkpoint_every=1000, sample_every=0, warmup_steps=0)
    return c


def test_a_shard_replaced_under_its_name_is_refused_or_reported_once(tmp_path):
    from sgm_jax.training.loop import train
    from sgm_jax.training.workdir import check_run_record

    data = tmp_path / "shards"
    data.mkdir()
    paths = _shards(data, 10)
    urls = str(data / "data-{000000..000001}.tar")
    assert train(_config(urls, 1), tmp_path / "run")["step"] == 1
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["shards"]
    assert recorded == {p: [os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths}

    _shards(data, 100)  # new images under the same names (same sizes: only the mtime tells)
    os.utime(paths[1], ns=(recorded[paths[1]][1], recorded[paths[1]][1]))  # this one looks untouched
    with pytest.raises(UserError) as info:
        train(_config(urls, 2), tmp_path / "run")
    assert str(info.value) == (
        f"1 shard(s) changed (size or modification time) since {tmp_path / 'run'} last trained on them: {paths[0]}; "
        "the checkpoint's data position refers to the old ones: restore them, use a new --workdir, or resume on "
        "the new ones with --config.data.allow_changed_shards=True")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["shards"] == recorded  # nothing rewritten

    from sgm_jax.data import from_config

    stamps = from_config(_config(urls, 2).data).source.file_stamps()
    lines: list[str] = []
    check_run_record(tmp_path / "run", from_config(_config(urls, 2).data).source.describe(), stamps,
                     allow_changed_shards=True, report=lines.append)
    assert lines == [f"warning: 1 shard(s) changed (size or modification time) since {tmp_path / 'run'} last "
                     f"trained on them: {paths[0]}; resuming on the new ones (data.allow_changed_shards)"]
