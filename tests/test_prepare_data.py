"""prepare_data.py: image folders (captions / class folders) and CSV tables -> shards the pipeline reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgm_jax.data import webdataset as W
from sgm_jax.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos():
    skdata = pytest.importorskip("skimage.data")
    return {"coffee": skdata.coffee(), "chelsea": skdata.chelsea(), "rocket": skdata.rocket()}


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_folder_with_captions(photos, tmp_path):
    for name, img in photos.items():
        _save(tmp_path / "in" / f"{name}.jpg", img)
        (tmp_path / "in" / f"{name}.txt").write_text(f"a photo of {name}\n")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "in" / "broken.txt").write_text("lost")
    result = prepare(str(tmp_path / "in"), str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert result["samples"] == 3 and len(result["paths"]) == 2 and result["skipped"][0].endswith("broken.png")
    assert result["urls"] == str(tmp_path / "out" / "data-{000000..000001}.tar")
    samples = [s for p in W.expand_urls(result["urls"]) for s in W.shard_samples(p)]
    by_caption = {s["txt"].decode(): s for s in samples}
    assert set(by_caption) == {f"a photo of {n}" for n in photos}
    coffee = by_caption["a photo of coffee"]
    assert coffee["jpg"] == (tmp_path / "in" / "coffee.jpg").read_bytes()  # original bytes, not re-encoded
    assert json.loads(coffee["json"]) == {"width": 600, "height": 400, "source": "coffee.jpg"}
    with pytest.raises(Exception, match="already holds"):
        prepare(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    # --overwrite from a folder with nothing readable: one error, the earlier shards kept as they were
    before = {p: Path(p).read_bytes() for p in result["paths"]}
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.png").write_bytes(b"not a png")
    (tmp_path / "unreadable" / "x.txt").write_text("a caption")
    with pytest.raises(Exception, match="no readable image"):
        prepare(str(tmp_path / "unreadable"), str(tmp_path / "out"), overwrite=True, progress=False)
    assert {p: Path(p).read_bytes() for p in result["paths"]} == before
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["data-000000.tar", "data-000001.tar"]


def test_class_folders_and_csv(photos, tmp_path):
    for name, img in photos.items():
        for i in range(2):
            _save(tmp_path / "classes" / name / f"{i}.png", img[i:, i:])
    result = prepare(str(tmp_path / "classes"), str(tmp_path / "out"), samples_per_shard=4, progress=False)
    samples = [s for p in result["paths"] for s in W.shard_samples(p)]
    assert len(samples) == 6
    for s in samples:  # ids are the sorted folder names' indices: chelsea 0, coffee 1, rocket 2
        meta = json.loads(s["json"])
        assert int(s["cls"]) == sorted(photos).index(meta["class_name"])
        assert (meta["height"], meta["width"]) in {(h - i, w - i) for (h, w, _) in
                                                   [photos[meta["class_name"]].shape] for i in (0, 1)}
    table = tmp_path / "table.csv"
    table.write_text("path,caption\nclasses/coffee/0.png,hot coffee\nclasses/rocket/1.png,a rocket\n")
    out = tmp_path / "csv_out"
    proc = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), str(table), str(out),
                           "--samples-per-shard", "5", "--shuffle-seed", "-1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"datapipeline.urls: {out / 'data-000000.tar'}" in proc.stdout
    assert [s["txt"].decode() for s in W.shard_samples(str(out / "data-000000.tar"))] == ["hot coffee", "a rocket"]
    missing = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), str(tmp_path / "nope"), str(out)],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope'} does not exist"


def test_a_caption_that_is_not_utf8_is_named_skipped_and_counted(tmp_path):
    for name, value in (("a", 10), ("b", 200), ("latin1", 90)):
        _save(tmp_path / "in" / f"{name}.png", np.full((8, 8, 3), value, np.uint8))
    (tmp_path / "in" / "a.txt").write_text("a dark square")
    (tmp_path / "in" / "b.txt").write_text("a bright square")
    (tmp_path / "in" / "latin1.txt").write_bytes("un carr\xe9 gris".encode("latin-1"))
    proc = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), str(tmp_path / "in"), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {tmp_path / 'in' / 'latin1.txt'} is not UTF-8 text; skipping latin1.png" in proc.stderr
    assert "wrote 2 samples in 1 shards; skipped 1 unreadable images or captions" in proc.stdout
    captions = sorted(s["txt"].decode() for s in W.shard_samples(str(tmp_path / "out" / "data-000000.tar")))
    assert captions == ["a bright square", "a dark square"]


def test_a_source_that_is_an_image_or_a_non_utf8_table_is_one_line(tmp_path):
    image = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    proc = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), str(image), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {image} is neither a folder nor a .csv / .parquet table: give a folder of images (with same-name "
        ".txt captions or class sub-folders) or a table of path,caption rows")
    table = tmp_path / "table.csv"
    table.write_bytes("path,caption\nphoto.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(Exception, match=f"^{table} is not UTF-8 text: save the path,caption table as UTF-8$"):
        prepare(str(table), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
