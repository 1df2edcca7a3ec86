"""sample.py / the demo on a trained workdir gone wrong: a corrupt newest checkpoint, an autoencoder's
workdir, seeds beyond the generator's range, a full disk. A tiny class-conditional model is trained here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import capped_file_size
from test_demo import tiny_train_config

from sgm_jax.cli import sample as sample_cli
from sgm_jax.cli.configs import load_config
from sgm_jax.errors import UserError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from sgm_jax.training.loop import train

    workdir = tmp_path_factory.mktemp("faults") / "tiny"
    config = tiny_train_config(max_steps=2)
    config.training.checkpoint_every = 1
    train(config, workdir)
    return workdir


def _sample(capsys, *args) -> tuple[int, str]:
    rc = sample_cli.main([*map(str, args), "--no-cache"])
    return rc, capsys.readouterr().err.strip()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_seeds_beyond_the_generator_range_are_reduced_modulo_2_32(workdir, tmp_path, capsys):
    import jax

    from sgm_jax.inference.sampling import seed_key

    for seed in (2**70 + 5, 5):
        rc, err = _sample(capsys, "--workdir", workdir, "--classes", "3", "--seed", seed, "--out", tmp_path / f"{seed}.png")
        assert rc == 0, err
    assert np.array_equal(_pixels(tmp_path / f"{2**70 + 5}.png"), _pixels(tmp_path / "5.png"))
    assert Image.open(tmp_path / f"{2**70 + 5}.png").text["seed"] == str(2**70 + 5)  # the seed as typed
    # below 2**63 JAX already kept the low 32 bits: those seeds give the images they always gave
    assert np.array_equal(jax.random.key_data(seed_key(2**40 + 7)), jax.random.key_data(jax.random.key(2**40 + 7)))


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_sampled(workdir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    assert sorted(int(p.name) for p in (broken / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    for f in (broken / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    rc, err = _sample(capsys, "--workdir", broken, "--classes", "3", "--out", tmp_path / "fallback.png")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 2 does not restore (")
    assert warnings[0].endswith("; sampling from the previous one")
    rc, err = _sample(capsys, "--workdir", workdir, "--classes", "3", "--step", "1", "--out", tmp_path / "step1.png")
    assert rc == 0, err
    assert np.array_equal(_pixels(tmp_path / "fallback.png"), _pixels(tmp_path / "step1.png"))


def test_a_grid_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with capped_file_size(512):
        rc, err = _sample(capsys, "--workdir", workdir, "--classes", "1,2", "--num", "2", "--out", out / "grid.png")
    assert rc == 3 and "Traceback" not in err and err.splitlines()[-1] == (
        f"error: writing {out / 'grid.png'} failed: File too large (disk full or not writable?); nothing was "
        "written there")
    assert list(out.iterdir()) == []


def test_an_autoencoder_workdir_says_what_it_is_for(tmp_path, capsys):
    from sgm_jax.cli import demo
    from sgm_jax.inference.service import ModelSource

    ae = tmp_path / "autoencoder_mnist"
    ae.mkdir()
    (ae / "config.json").write_text(load_config("autoencoder_mnist").to_json())
    (ae / "run.json").write_text(json.dumps({"image_shape": [32, 32, 1], "task": "autoencoder"}))
    expected = (f"{ae} holds an autoencoder (a first stage), which has no sampler: use it as a latent model's first "
                f"stage (--config.model.params.first_stage_config.params.ckpt_path={ae}) or export it "
                f"(python -m sgm_jax.autoencoding.firststage {ae} --safetensors FILE)")
    rc, err = _sample(capsys, "--workdir", ae, "--out", tmp_path / "x.png")
    assert rc == 2 and err == f"error: {expected}"
    with pytest.raises(UserError) as info:
        ModelSource.parse(str(ae))
    assert str(info.value) == expected
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--model", str(ae)])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder_mnist"]
