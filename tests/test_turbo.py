"""SDXL-Turbo / SD-Turbo (the seed's scripts/demo/turbo.py): configs, SubstepSampler specs, the
released files' layouts (full size, abstract) and fp16 conversion, and sample.py in one step.

The sampler's own maths (sigmas, one- and two-step trajectories) is in tests/test_samplers.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from sgm_jax.cli import convert as convert_cli_module
from sgm_jax.configs.inference import sd_2_1, sd_turbo, sd_xl_base, sd_xl_turbo
from sgm_jax.convert import checkpoint as ck
from sgm_jax.convert.layout import engine_parts
from sgm_jax.diffusion import guiders, instantiate_from_config
from sgm_jax.diffusion import samplers as smp
from sgm_jax.engine import DiffusionEngine
from sgm_jax.inference import SamplerSpec
from sgm_jax.inference.sampling import canonical_sampler_name
from test_inference import BPE, convert_cli, write_random_checkpoint
from test_samplers import seed_turbo_sigmas

REPO = Path(__file__).resolve().parents[1]
TINY_SDXL_TURBO = REPO / "configs" / "inference" / "tiny_sdxl_turbo.py"
TINY_SD_TURBO = REPO / "configs" / "inference" / "tiny_sd_turbo.py"
# Entries of real files that are not parameters (layout.py): transformers' position_ids, OpenCLIP's
# logit_scale, and DiscreteDenoiser's sigmas buffer, which files saved by sgm itself carry
SDXL_EXTRAS = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
               "conditioner.embedders.1.model.logit_scale": (), "denoiser.sigmas": (1000,)}
SD2_EXTRAS = {"denoiser.sigmas": (1000,)}


class Header(dict):
    """A checkpoint seen through its header only, {key: shape}: what validate_checkpoint reads."""

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self[key]


def sgm_sd2_layout(keys):
    """SD 2.x keys as sgm itself saves them (sd_turbo.safetensors): the text tower under
    conditioner.embedders.0.model. instead of the original LatentDiffusion's cond_stage_model.model."""
    return {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in keys.items()}


# ----------------------------------------------------------------------------- sampler spec


def test_spec_is_turbo_py_substeps_without_guidance():
    assert canonical_sampler_name("SubstepSampler") == "substep_euler_ancestral"
    for n in (1, 2, 4):
        spec = SamplerSpec.create("SubstepSampler", n, "LegacyDDPMDiscretization")
        assert spec.name == "substep_euler_ancestral" and spec.num_loop == n
        np.testing.assert_allclose(spec.sigmas(), seed_turbo_sigmas(n), rtol=1e-6, atol=0)
        sampler = spec.build(5.0)
        # guidance off whatever the scale: the seed's SubstepSampler uses uc = cond
        assert not spec.guided and isinstance(sampler.guider, guiders.IdentityGuider)
        assert (sampler.n_sample_steps, sampler.num_steps, sampler.eta) == (n, 1000, 1.0)
    with pytest.raises(ValueError, match=r"takes 1 to 4 steps .* got 5$"):  # when it is built (sample.py: one line)
        SamplerSpec.create("substep_euler_ancestral", 5).sigmas()
    with pytest.raises(ValueError, match="takes no option"):
        SamplerSpec.create("substep_euler_ancestral", 1, order=3)
    # img2img / refiner wrappers shorten the schedule the substeps index: one clear line
    with pytest.raises(ValueError, match="img2img and refiner hand-offs are not supported"):
        SamplerSpec.create("substep_euler_ancestral", 1, img2img_strength=0.5).sigmas()


def test_seed_style_config_builds_the_sampler():
    """turbo.py's SubstepSampler(n_sample_steps=..., num_steps=1000, eta=1.0, discretization_config=...)."""
    sampler = instantiate_from_config({"target": "SubstepSampler", "params": {
        "n_sample_steps": 2, "num_steps": 1000, "eta": 1.0, "steps_subset": [0, 100, 200, 300, 1000],
        "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}})
    assert isinstance(sampler, smp.SubstepSampler) and sampler.steps_subset == (0, 100, 200, 300, 1000)
    np.testing.assert_allclose(sampler.sigmas(), seed_turbo_sigmas(2), rtol=1e-6)
    hash(sampler)  # a list from a yaml is stored as a tuple


# ----------------------------------------------------------------------------- configs and layouts


@pytest.mark.parametrize("turbo,base", [(sd_xl_turbo, sd_xl_base), (sd_turbo, sd_2_1)], ids=["sdxl", "sd"])
def test_configs_are_the_base_architecture_with_turbo_defaults(turbo, base):
    config = turbo.get_config()
    assert config.model.to_dict() == base.get_config().model.to_dict()  # turbo.py loads the base yaml
    inf = config.inference
    assert (inf.width, inf.height, inf.num_steps, inf.cfg_scale) == (512, 512, 1, 1.0)
    assert canonical_sampler_name(inf.sampler) == "substep_euler_ancestral" and inf.guider == "IdentityGuider"
    assert inf.discretization == "LegacyDDPMDiscretization"
    assert len(inf.tokenizers) == len(base.get_config().inference.tokenizers)


@pytest.mark.parametrize("turbo,extras,layouts", [
    (sd_xl_turbo, SDXL_EXTRAS, ("sgm",)),
    (sd_turbo, SD2_EXTRAS, ("ldm", "sgm")),  # cond_stage_model.model. or conditioner.embedders.0.model.
], ids=["sd_xl_turbo_1.0", "sd_turbo"])
def test_full_size_released_layouts_validate(turbo, extras, layouts):
    """Every key of a full-size file in the released layout (shapes from the abstract init, no
    weights) is consumed by the turbo config, and nothing is missing."""
    config = turbo.get_config()
    shapes = ck.checkpoint_shapes(config)
    for layout in layouts:
        header = Header({**(sgm_sd2_layout(shapes) if layout == "sgm" and turbo is sd_turbo else shapes), **extras})
        parts = engine_parts(config, header.keys())
        ck.validate_checkpoint(header, parts)  # raises on any missing / unexpected / mis-shaped key
        consumed = {k for p in parts for k in p.keys()}
        assert consumed == set(header) - set(extras)


@pytest.mark.parametrize("config_path,dtype,layout", [
    (TINY_SDXL_TURBO, np.float16, "sgm"),    # sd_xl_turbo_1.0_fp16.safetensors
    (TINY_SDXL_TURBO, np.float32, "sgm"),    # sd_xl_turbo_1.0.safetensors
    (TINY_SD_TURBO, np.float32, "sgm"),      # sd_turbo.safetensors, as sgm saves it
    (TINY_SD_TURBO, np.float16, "ldm"),      # an SD 2.1-style export of it
], ids=["sdxl_fp16", "sdxl_fp32", "sd_sgm", "sd_ldm_fp16"])
def test_random_seed_layout_files_convert_every_key(config_path, dtype, layout, tmp_path, monkeypatch, capsys):
    from sgm_jax.inference import load_config

    config = load_config(config_path)
    path = write_random_checkpoint(config, tmp_path / "turbo.safetensors", 0, dtype=dtype)
    sd = dict(ck.open_checkpoint(path))
    extras = SDXL_EXTRAS if "sdxl" in config_path.name else SD2_EXTRAS
    sd.update({k: np.zeros(s, dtype) for k, s in extras.items()})
    if layout == "sgm":
        sd = sgm_sd2_layout(sd)
    path = ck.save_safetensors(sd, tmp_path / "released.safetensors")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # main() sets it; restored afterwards
    out = tmp_path / "converted"
    assert convert_cli_module.main(["--config", str(config_path), "--checkpoint", str(path),
                                    "--output", str(out)]) == 0, capsys.readouterr().err
    params = ck.load_params(out)
    assert ck.read_metadata(out)["dtypes"] == [np.dtype(dtype).name]  # --dtype keep: float16 stays float16
    parts = engine_parts(config, sd.keys())
    assert sum(len(p.keys()) for p in parts) == len(sd) - len(extras)
    for part in parts:  # every key of the file landed, bit for bit, where the config wants it
        for key, (sub, kind, _) in part.keys().items():
            leaf = params
            for name in part.params_path + sub:
                leaf = leaf[name]
            want = np.transpose(sd[key], (1, 0) if kind == "linear" else (2, 3, 1, 0)) if kind != "copy" else sd[key]
            assert leaf.dtype == dtype and np.array_equal(leaf, want), key


def test_sd_turbo_layout_with_the_wrong_config_is_named(tmp_path):
    """sgm-layout SD 2.x weights (sd_turbo.safetensors) with the SDXL-Turbo config: the message
    says what the file looks like (it used to say an SDXL refiner)."""
    from sgm_jax.inference import load_config

    sd = sgm_sd2_layout(ck.checkpoint_shapes(load_config(TINY_SD_TURBO)))
    with pytest.raises(ck.CheckpointMismatchError, match="looks like an SD 2.x checkpoint in sgm's layout"):
        ck.validate_checkpoint(Header(sd), engine_parts(load_config(TINY_SDXL_TURBO), sd.keys()))


# ----------------------------------------------------------------------------- sample.py


@pytest.mark.skipif(not BPE.is_file(), reason=f"CLIP BPE vocabulary {BPE} absent (../shared/data/clip)")
def test_sample_cli_tiny_sdxl_turbo_is_one_unguided_denoiser_call(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    import sample
    from sgm_jax.inference import load_config

    monkeypatch.setenv("SGM_JAX_CLIP_BPE", str(BPE))
    st = write_random_checkpoint(load_config(TINY_SDXL_TURBO), tmp_path / "turbo.safetensors", 3)
    checkpoint = convert_cli(TINY_SDXL_TURBO, st, tmp_path / "tiny_sdxl_turbo")
    calls = []
    denoise = DiffusionEngine.denoise

    def counted(self, params, x, sigma, cond):  # runs once per denoiser evaluation, inside the compiled loop
        jax.debug.callback(lambda s: calls.append((s.shape[0], float(s[0]))), sigma)
        return denoise(self, params, x, sigma, cond)

    monkeypatch.setattr(DiffusionEngine, "denoise", counted)
    out = tmp_path / "turbo.png"
    capsys.readouterr()
    assert sample.main(["--config", str(TINY_SDXL_TURBO), "--checkpoint", str(checkpoint), "--prompt",
                        "a cinematic shot of a baby racoon", "--num", "1", "--seed", "5", "--no-cache",
                        "--out", str(out)]) == 0, capsys.readouterr().err
    assert "substep_euler_ancestral 1 steps, cfg 1.0" in capsys.readouterr().out
    # one step at sigma_max on the image itself: no CFG batch of two
    assert calls == [(1, pytest.approx(float(seed_turbo_sigmas(1)[0]), rel=1e-6))]
    image = Image.open(out)
    image.verify()
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 1.0
    assert {k: image.text[k] for k in ("sampler", "steps", "cfg_scale")} == {
        "sampler": "substep_euler_ancestral", "steps": "1", "cfg_scale": "1.0"}
