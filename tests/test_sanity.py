"""Degenerate results are flagged: an untrained U-Net's cells through the real sample / evaluate / report path
are named in the warnings, metrics.json and report.md's banner; real images passed as samples are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cfg.data.datasets import load_dataset
from cfg.data.images import to_uint8
from cfg.engine.generate import sample_checkpoint
from cfg.eval.cells import evaluate_samples, metrics_from_params
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.sanity import (
    accuracy_floor,
    chance_accuracy,
    degenerate_cells,
    describe,
    noise_fid,
)
from cfg.eval.stats import reference_stats
from cfg.nets.classifier import ClassifierConfig, accuracy, train_classifier
from cfg.nets.unet import UNet, UNetConfig
from cfg.study.config import params_from_dict
from cfg.study.records import SampleSet
from cfg.study.report import write_report

ROOT = Path(__file__).resolve().parents[1]
# the real params.yaml, shrunk: 3 w (unconditional, conditional, guided), few sampling steps
TINY = {
    "sample": {"w": [-1.0, 0.0, 1.0], "steps": 4, "n_samples": 200, "batch_size": 600},
    "evaluate": {"metric_options": {"kid": {"subsets": 5, "subset_size": 50}, "precision_recall": {"k": 3}}},
}


@pytest.fixture(scope="module")
def study():
    """(params, digits, extractor, reference): a tiny evaluation classifier trained on digits, reference
    statistics of the test set."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    params = params_from_dict(raw)
    ds = load_dataset("digits", image_size=8)
    clf, _ = train_classifier(
        ds.train_x,
        ds.train_y,
        ClassifierConfig(in_channels=1, num_classes=10, image_size=8, width=16, feature_dim=32),
        epochs=8,
        lr=2e-3,
    )
    assert accuracy(clf, ds.test_x, ds.test_y) > 0.8
    ext = classifier_extractor(clf)
    ref = reference_stats(extract_features(ext, to_uint8(ds.test_x)), ext, labels=ds.test_y)
    return params, ds, ext, ref


def _evaluate(samples: SampleSet, params, ext, ref):
    noise = noise_fid(ext, ref, samples.n_samples, tuple(samples.images.shape[2:]), seed=samples.seed)
    return evaluate_samples(
        samples, ext, ref, metrics=metrics_from_params(params.evaluate), noise_fid=noise, seed_ranges=1
    )


def _report(records, tmp_path: Path) -> tuple[dict, str]:
    from PIL import Image

    grid = tmp_path / "grid.png"
    Image.new("L", (40, 80)).save(grid)
    _, summ = write_report(
        records,
        grid_images={0.1: grid},
        classifier_accuracy=0.9,
        data_name="digits",
        experiment="test",
        table=tmp_path / "tradeoff.csv",
        metrics=tmp_path / "metrics.json",
        plots=tmp_path / "plots",
        report=tmp_path / "report.md",
    )
    return json.loads((tmp_path / "metrics.json").read_text()), (tmp_path / "report.md").read_text()


def test_the_near_chance_floor():
    assert accuracy_floor(0.1, 400) == pytest.approx(0.325)  # 10 classes: a quarter of the way to 1
    assert accuracy_floor(0.5, 40) == pytest.approx(0.5 + 3 * (0.25 / 40) ** 0.5)  # 2 classes, few samples
    assert chance_accuracy(torch.arange(40) % 10) == 0.1
    assert chance_accuracy(torch.tensor([0, 0, 1])) == pytest.approx(2 / 3)


def test_an_untrained_model_is_flagged_in_every_output(study, tmp_path):
    params, ds, ext, ref = study
    torch.manual_seed(0)
    model = UNet(
        UNetConfig.from_params(params.model, image_size=8, in_channels=1, num_classes=10)
    ).eval()  # freshly initialised: what a run whose EMA still holds the initial weights samples
    meta = {"p_uncond": 0.1, "classes": ds.classes}
    samples = sample_checkpoint(model, meta, params, checkpoint="untrained.pt", device="cpu")
    records = _evaluate(samples, params, ext, ref)

    assert all(r.chance_acc == 0.1 and r.noise_fid > 0 for r in records)
    flagged = degenerate_cells(records)
    assert [(c["p_uncond"], c["w"]) for c in flagged] == [(0.1, -1.0), (0.1, 0.0), (0.1, 1.0)]
    by_w = {c["w"]: " ".join(c["reasons"]) for c in flagged}
    assert "near chance" not in by_w[-1.0], "w = -1 is unconditional: its accuracy is not checked"
    for w in (0.0, 1.0):
        assert "near chance" in by_w[w] and "no better than noise" in by_w[w], by_w[w]
    lines = describe(flagged, len(records))
    assert lines[0].startswith("3 of 3 cells are degenerate") and "p_uncond=0.1 w=0:" in lines[2]

    metrics, report = _report(records, tmp_path)
    assert metrics["degenerate_cells"] == flagged
    assert report.startswith("> **Warning:** 3 of 3 cells are degenerate")
    assert "> - p_uncond=0.1 w=1: class_acc" in report


def test_real_images_as_samples_are_not_flagged(study, tmp_path):
    params, ds, ext, ref = study
    n = 200
    images = to_uint8(ds.train_x[:n])  # real digits, not the reference's test images
    samples = SampleSet(
        images=images.expand(3, *images.shape).clone(),  # the same real images at every w
        labels=ds.train_y[:n],
        w=[-1.0, 0.0, 1.0],
        classes=ds.classes,
        p_uncond=0.1,
        guidance="cfg",
        guidance_options={},
        sampler="ancestral",
        sampler_options={},
        steps=4,
        seed=1,
        checkpoint="real",
        train_run_id=None,
        checkpoint_params_hash="",
    )
    records = _evaluate(samples, params, ext, ref)
    assert all(r.metrics["class_acc"] > 0.8 and r.metrics["fid"] < 0.1 * r.noise_fid for r in records)
    assert degenerate_cells(records) == []
    metrics, report = _report(records, tmp_path)
    assert metrics["degenerate_cells"] == []
    assert report.startswith("# Classifier-free guidance") and "Warning" not in report
