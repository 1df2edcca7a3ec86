"""The command lines: configs by name or file, --config.x=y overrides, one-line errors that
create nothing, sample.py's value checks, and the installed package outside the source tree."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

from sgm_jax.cli import sample as sample_cli
from sgm_jax.cli import train as train_cli
from sgm_jax.cli.configs import apply_overrides, load_config, packaged_config_names, split_overrides
from sgm_jax.errors import UserError


def test_configs_by_name_path_and_source_spelling():
    names = packaged_config_names()
    assert {"mnist_cond_cpu", "inference/sd_xl_base", "inference/tiny_sdxl"} <= set(names)
    by_name = load_config("inference/sd_xl_base")
    assert load_config("configs/inference/sd_xl_base.py").to_dict() == by_name.to_dict()
    assert load_config(REPO / "configs" / "inference" / "sd_xl_base.py").inference.width == 1024
    assert by_name.inference.refiner_config == "inference/sd_xl_refiner"
    with pytest.raises(UserError, match="not found: neither a file nor one of the configs shipped"):
        load_config("configs/mnist_cnod.py")


def test_overrides_parse_by_field_type_and_name_the_bad_field():
    config = load_config("mnist_cond_cpu")
    rest, overrides = split_overrides(["--workdir", "w", "--config.training.max_steps=7",
                                       "--config.model.params.use_ema", "false",
                                       "--config.model.params.network_config.params.channel_mult=(1,2)",
                                       "--config.model.base_learning_rate=3e-4", "--config.data.params.path=/x"])
    assert rest == ["--workdir", "w"]
    apply_overrides(config, overrides)
    assert config.training.max_steps == 7 and config.model.params.use_ema is False
    assert config.model.params.network_config.params.channel_mult == (1, 2)
    assert config.model.base_learning_rate == 3e-4 and config.data.params.path == "/x"
    cases = {"training.max_minuts=1": "did you mean --config.training.max_minutes?",
             "training.max_steps=ten": "expected an integer",
             "model.params.use_ema=maybe": "expected true or false",
             "training=1": "is a section",
             "model.params.conditioner_config.params.emb_models.3.ucg_rate=0": "a list of 1"}
    for text, message in cases.items():
        field, _, value = text.partition("=")
        with pytest.raises(UserError, match=message.replace("?", r"\?")) as info:
            apply_overrides(config, [(field, value)])
        assert "\n" not in str(info.value)


def run_main(main, args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return info.value.code, err


@pytest.mark.parametrize("args, message", [
    (["--config", "no_such_config.py"], "config 'no_such_config.py' not found"),
    (["--config.training.max_minuts=1"], "no field 'max_minuts' in config.training"),
    (["--config.training.max_steps=x"], "expected an integer"),
])
def test_train_bad_input_is_one_line_and_creates_nothing(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(train_cli.main, [*args, "--workdir", tmp_path / "run"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "num_samples must be a positive integer, got 0 (flag --num)"),
    (["--num", "-2"], "num_samples must be a positive integer, got -2"),
    (["--steps", "0"], "num_steps must be a positive integer"),
    (["--width", "0"], "width must be a positive integer"),
    (["--height", "-64"], "height must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--config.inference.num_steps=0"], "num_steps must be a positive integer"),
    (["--strength", "1.5"], "img2img_strength must be in [0, 1]"),
    (["--classes", "1"], "--classes / --no-ema / --step are for a train.py --workdir"),
    (["--workdir", "somewhere"], "pass --config (SDXL / SD 2.1 inference config) or --workdir"),
    (["--sampler-option", "eta"], "expected NAME=NUMBER"),
    (["--config.inference.nums=1"], "did you mean --config.inference.num_steps?"),
    (["--sampler", "bogus"], "argument --sampler: invalid choice: 'bogus'"),
    (["--num", "100000", "--out", "/tmp/big_grid.png"], "a grid of 100000 images is too large"),
    (["--lora", "style.safetensors:abc"], "--lora style.safetensors:abc: the scale 'abc' is not a number"),
])
def test_sample_bad_values_are_one_line_before_any_work(args, message, tmp_path, capsys):
    rc = sample_cli.main(["--config", "inference/tiny_sdxl", "--checkpoint", str(tmp_path / "none"),
                          "--out", str(tmp_path / "out"), "--no-cache", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_sample_output_location_checked_first(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, message in ((blocker / "img.png", "is a file, not a folder"), (blocker, "is a file; give a folder"),
                         (tmp_path, "")):
        rc = sample_cli.main(["--config", "inference/tiny_sdxl", "--checkpoint", str(tmp_path / "none"),
                              "--out", str(out), "--no-cache"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    # the last one got past the output check to the missing weights, naming the convert command
    assert "converted weights not found" in err and "convert_torch_weights.py" in err


def _setuptools_builds_wheels() -> bool:
    """Whether the installed setuptools meets pyproject's build requirement and builds wheels by
    itself (70.1+, or older with the `wheel` package): a fresh venv's 65.5 does neither."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return installed >= (70, 1) or (installed >= (68, 0) and importlib.util.find_spec("wheel") is not None)


def test_wheel_ships_the_configs_and_runs_outside_the_source_tree(tmp_path):
    """A non-editable build: the wheel holds sgm_jax.configs, and its commands work from any folder."""
    dist = tmp_path / "dist"
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []  # else pip fetches setuptools
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("sgm_jax-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert {"sgm_jax/configs/mnist_cond_cpu.py", "sgm_jax/configs/inference/sd_xl_base.py",
            "sgm_jax/configs/inference/_parts.py", "sgm_jax/cli/train.py", "sgm_jax/train.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = (tmp_path / "site" / entry_points).read_text()
    for script in ("sgm-train", "sgm-sample", "sgm-convert", "sgm-demo"):
        assert script in scripts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import sgm_jax.configs.inference.sd_xl_base as m; print(m.__file__)")
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where.stdout + where.stderr
    helped = run("-m", "sgm_jax.train", "--help")
    assert helped.returncode == 0 and "mnist_cond_cpu" in helped.stdout and "inference/sd_xl_base" in helped.stdout
    typo = run("-m", "sgm_jax.train", "--config", "mnist_cond_cpu", "--config.training.max_minuts=1")
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "error: --config.training.max_minuts: no field 'max_minuts' in config.training "
        "(did you mean --config.training.max_minutes?)"]
    missing = run("-m", "sgm_jax.cli.sample", "--config", "inference/sd_xl_base", "--checkpoint", "weights",
                  "--out", "out")
    assert missing.returncode == 2 and "converted weights not found" in missing.stderr, missing.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing created by failed commands


def test_demo_without_usable_models_is_one_line(tmp_path, capsys):
    from sgm_jax.cli import demo

    code, err = run_main(demo.main, ["--model", tmp_path / "nothing_here"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "neither a train.py workdir nor converted weights" in err


def test_one_line_messages():
    from sgm_jax.errors import one_line

    assert one_line(KeyError("original_size_as_tuple")) == \
        "missing key 'original_size_as_tuple' (SGM_JAX_TRACEBACK=1 shows where)"
    assert one_line(KeyError("unknown dataset 'x'; known: ['mnist']")) == "unknown dataset 'x'; known: ['mnist']"
    assert one_line(ValueError("two\n  lines")) == "two lines"
    assert one_line(ValueError()) == "ValueError"
