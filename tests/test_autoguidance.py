"""Autoguidance's guide network in the pipeline: the params schema's guide section, the train_guide stage when no
method needs a guide, and the sample stage's loading of the guide, which refuses one that does not fit the model.
(The maths, autoguidance with the model's own unconditional branch as guide = CFG, is in test_guidance_methods.)"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from cfg.engine.generate import load_guide, sample_checkpoint
from cfg.nets.unet import UNet, UNetConfig, save_checkpoint
from cfg.study.config import ParamsError, ParamsWarning, needs_guide, params_from_dict

from .conftest import ROOT, run

AUTO = {"cfg": {}, "ag": {"method": "autoguidance"}}  # a second label for it, as sample.guidance allows


def _raw(**sections) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values
    return raw


def test_a_guide_is_needed_only_for_a_method_that_calls_one():
    assert not needs_guide(params_from_dict(_raw()))  # the shipped default: CFG only
    assert not needs_guide(params_from_dict(_raw(sample={"guidance": {"cfg": {}, "interval": {}}})))
    assert needs_guide(params_from_dict(_raw(sample={"guidance": AUTO})))
    assert needs_guide(params_from_dict(_raw(sample={"guidance": {"autoguidance": {}}})))


def test_the_guide_model_is_the_model_section_with_guide_model_in_place():
    """guide.model's values come out of the config validated (an integer dropout as the schema's float), for the
    train_guide stage to lay over the model section."""
    params = params_from_dict(_raw(guide={"model": {"base_width": 8, "blocks_per_level": 2, "dropout": 0}}))
    assert params.guide.model == {"base_width": 8, "blocks_per_level": 2, "dropout": 0.0}
    assert isinstance(params.guide.model["dropout"], float)
    m = dataclasses.replace(params.model, **params.guide.model)  # as pipelines/train.py --guide does
    assert (m.base_width, m.blocks_per_level, m.dropout) == (8, 2, 0.0)
    assert m.channel_mult == params.model.channel_mult and m.head_channels == params.model.head_channels


@pytest.mark.parametrize(
    ("guide", "message"),
    [
        ({"model": {"widht": 8}}, r"unknown key guide\.model\.widht; allowed keys of guide\.model: \["),
        ({"model": {"base_width": 4}}, r"guide\.model\.base_width = 4 is out of range: allowed value >= 8"),
        ({"model": {"dropout": "none"}}, r"guide\.model\.dropout = 'none' must be a number"),
        ({"steps": 0}, r"guide\.steps = 0 is out of range: allowed value >= 1"),
        ({"p_uncond": 1.0}, r"guide\.p_uncond = 1\.0 is out of range: allowed value >= 0 and value < 1"),
        ({"model": []}, r"guide\.model must be a mapping"),
    ],
)
def test_bad_guide_settings_are_refused_with_or_without_autoguidance(guide, message):
    for sample in ({}, {"guidance": AUTO}):
        with pytest.raises(ParamsError, match=message):
            params_from_dict(_raw(guide=guide, sample=sample))


def test_a_guide_the_image_does_not_fit_is_refused_only_where_autoguidance_uses_it():
    # digits at 8 x 8: five levels halve it four times, to 0.5 pixels
    deep = {"model": {"channel_mult": [1, 1, 1, 1, 1]}}
    params_from_dict(_raw(guide=deep))  # no method needs the guide: nothing is built from it
    with pytest.raises(
        ParamsError,
        match=r"guide\.model\.channel_mult = \[1, 1, 1, 1, 1\] halves the image 4 times, so its side must be a "
        r"multiple of 16, and data\.image_size = 8 is not",
    ):
        params_from_dict(_raw(guide=deep, sample={"guidance": AUTO}))


def test_a_guide_no_weaker_than_the_model_warns():
    steps = params_from_dict(_raw()).train.steps
    same = {"model": {}, "steps": steps}
    with pytest.warns(ParamsWarning, match=r"not weaker than the model: 191,073 parameters against 191,073"):
        params_from_dict(_raw(guide=same, sample={"guidance": AUTO}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params_from_dict(_raw(guide=same))  # not used
        params_from_dict(_raw(guide={"model": {}, "steps": steps // 4}, sample={"guidance": AUTO}))  # shorter
        params_from_dict(_raw(sample={"guidance": AUTO}))  # the shipped guide: smaller and shorter


def test_a_guide_trained_mostly_inside_the_learning_rate_warm_up_warns():
    """The guide trains with the models' train.* settings, warm-up included: with guide.steps < 2 x train.warmup_steps
    most of its steps run below train.lr (the Fashion-MNIST methods run: 1,000 of 1,000, a guide of FID 272 alone)."""
    warm = params_from_dict(_raw()).train.warmup_steps
    with pytest.warns(
        ParamsWarning, match=rf"guide.steps = {warm} with train.warmup_steps = {warm}: .* 100% .*"
    ):
        params_from_dict(_raw(guide={"steps": warm}, sample={"guidance": AUTO}))
    with pytest.warns(ParamsWarning, match=r"mean lr 0\.(6|7)"):
        params_from_dict(_raw(guide={"steps": 2 * warm - 1}, sample={"guidance": AUTO}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params_from_dict(_raw(guide={"steps": warm}))  # not used
        params_from_dict(_raw(guide={"steps": 2 * warm}, sample={"guidance": AUTO}))  # half: fine


def test_the_guide_stage_without_autoguidance_writes_only_a_note(tmp_path):
    # the stage's script with --guide on the shipped params (CFG only): no data read, no model, no MLflow run
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    out = tmp_path / "models" / "guide"
    run(
        [sys.executable, str(ROOT / "pipelines" / "train.py"), "--guide", "--data", "absent.pt"]
        + ["--out-dir", str(out)],
        tmp_path,
    )
    assert sorted(p.name for p in out.iterdir()) == ["guide.json"]
    assert json.loads((out / "guide.json").read_text())["guide"] is None
    assert not (tmp_path / "mlflow.db").exists()


def _checkpoint(path: Path, *, image_size=8, num_classes=10, lambda_min=-20.0, fingerprint="data-a", seed=0):
    torch.manual_seed(seed)
    config = UNetConfig(image_size=image_size, num_classes=num_classes, base_width=8, head_channels=8)
    model = UNet(config).eval()
    with (
        torch.no_grad()
    ):  # a new U-Net predicts ε = 0 (zero-initialised output layers): make it say something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {
        "p_uncond": 0.0,
        "classes": [str(c) for c in range(num_classes)],
        "data_fingerprint": fingerprint,
        "train": {"lambda_min": lambda_min, "lambda_max": 20.0},
    }
    save_checkpoint(path, model, meta)
    return model, meta


def test_load_guide_returns_a_guide_that_fits_the_model(tmp_path):
    model, meta = _checkpoint(tmp_path / "model.pt")
    _checkpoint(tmp_path / "guide.pt", seed=1)
    guide = load_guide(tmp_path / "guide.pt", model, meta)
    assert isinstance(guide, UNet) and not guide.training


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"image_size": 16}, "image_size 16 (guide) vs 8 (model)"),
        ({"num_classes": 5}, "num_classes 5 (guide) vs 10 (model)"),
        ({"lambda_min": -10.0}, "train.lambda_min -10.0 (guide) vs -20.0 (model)"),
        ({"fingerprint": "data-b"}, "data_fingerprint 'data-b' (guide) vs 'data-a' (model)"),
    ],
)
def test_load_guide_refuses_a_guide_of_other_data_size_classes_or_lambda_range(tmp_path, change, named):
    model, meta = _checkpoint(tmp_path / "model.pt")
    _checkpoint(tmp_path / "guide.pt", **change)
    with pytest.raises(ValueError, match=r"does not fit the model it is to guide") as err:
        load_guide(tmp_path / "guide.pt", model, meta)
    assert named in str(err.value) and "dvc repro train_guide" in str(err.value)


def test_load_guide_without_a_guide_says_which_stage_makes_it(tmp_path):
    model, meta = _checkpoint(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match=r"no guide network was given.*dvc repro train_guide"):
        load_guide(None, model, meta)
    with pytest.raises(FileNotFoundError, match=r"there is no guide network at .*absent\.pt"):
        load_guide(tmp_path / "absent.pt", model, meta)


def test_sample_checkpoint_guides_autoguidance_rows_by_the_guide_and_records_it(tmp_path):
    model, meta = _checkpoint(tmp_path / "model.pt")
    guide, _ = _checkpoint(tmp_path / "guide.pt", seed=1)
    raw = _raw(sample={"guidance": AUTO, "w": [0.0, 1.0], "steps": 4, "n_samples": 20, "batch_size": 40})
    params = params_from_dict(raw)
    with pytest.raises(ValueError, match="no guide network was given"):
        sample_checkpoint(model, meta, params, checkpoint="model.pt", device="cpu")
    samples = sample_checkpoint(
        model, meta, params, checkpoint="model.pt", device="cpu", guide=guide, guide_checkpoint="guide.pt"
    )
    assert samples.guidance == ["cfg", "cfg", "autoguidance", "autoguidance"]
    assert samples.info()["guide_checkpoint"] == "guide.pt"
    cfg0, cfg1, auto0, auto1 = samples.images
    assert torch.equal(auto0, cfg0), "w = 0 is the conditional model alone, whatever guides it"
    assert not torch.equal(auto1, cfg1), "w = 1: the guide's ε(z, c) in place of the model's ε(z)"
    small = {"w": [0.0], "steps": 2, "n_samples": 20, "batch_size": 20}
    plain = sample_checkpoint(
        model, meta, params_from_dict(_raw(sample=small)), checkpoint="m.pt", device="cpu"
    )
    assert plain.guide_checkpoint is None


def test_the_guide_stage_reads_the_train_stage_settings_less_what_guide_replaces():
    # a train.* key added to the train stage but not to train_guide would change the guide without rerunning it
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train, guide = stages["train"]["do"], stages["train_guide"]
    assert set(guide["params"]) == set(train["params"]) - {"train.steps"} | {"guide", "sample.guidance"}
    # plus the module whose needs_guide_network decides whether the guide is trained at all
    assert set(guide["deps"]) == set(train["deps"]) | {"cfg/maths/guidance.py"}
    assert guide["cmd"].startswith("python pipelines/train.py --guide ")
    sample = stages["sample"]["do"]
    assert "models/guide" in sample["deps"] and "--guide models/guide/checkpoint.pt" in sample["cmd"]
