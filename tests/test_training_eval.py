"""FIDs during training: scoring the EMA weights every few steps leaves the trained weights bitwise unchanged,
keeps its values in the history, and the train stage writes them to eval.csv and MLflow as a curve."""

from __future__ import annotations

import csv
import sqlite3

import pytest
import torch

from cfg.data.datasets import load_dataset
from cfg.data.images import to_uint8
from cfg.engine.scoring import by_w, score_model
from cfg.engine.training import train_diffusion
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.stats import reference_stats
from cfg.nets.classifier import Classifier, ClassifierConfig
from cfg.nets.unet import load_checkpoint
from cfg.study.config import ParamsError, params_from_dict
from tests.conftest import VENV_BIN, run, shrink_params
from tests.test_training import KW, TINY, _assert_same_weights

SAMPLING = {"steps": 4, "sampler_options": {"clip_denoised": 1.0}, "seed": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def inputs():
    """(train_x, train_y, extractor, reference): digits and an untrained classifier's features."""
    ds = load_dataset("digits", image_size=8)
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(in_channels=1, num_classes=10, image_size=8, width=8, feature_dim=16))
    ext = classifier_extractor(clf.eval())
    ref = reference_stats(extract_features(ext, to_uint8(ds.test_x)), ext)
    return ds.train_x[:300], ds.train_y[:300], ext, ref


def test_scoring_the_ema_during_training_leaves_the_weights_bitwise_unchanged(inputs):
    train_x, train_y, ext, ref = inputs
    plain = train_diffusion(TINY, train_x, train_y, **KW)  # TINY has dropout: the global RNG is in use

    def evaluate(entry: dict) -> dict:
        scores = score_model(entry["ema"], [0.0, 1.0], 20, extractor=ext, reference=ref, sampling=SAMPLING)
        return by_w([0.0, 1.0], scores)

    scored = train_diffusion(TINY, train_x, train_y, **KW, callback=evaluate)
    _assert_same_weights(scored.model, plain.model)
    _assert_same_weights(scored.ema, plain.ema)
    assert [h["loss"] for h in scored.history] == [h["loss"] for h in plain.history]
    assert [sorted(h) for h in scored.history] == [
        sorted([*h, "fid_w0", "is_w0", "fid_w1", "is_w1"]) for h in plain.history
    ], "what the callback returns joins its history entry"

    # the check can fail: a callback that draws from the global RNG changes the later dropout masks
    def draw(entry: dict) -> None:
        torch.rand(1)

    disturbed = train_diffusion(TINY, train_x, train_y, **KW, callback=draw)
    with pytest.raises(AssertionError, match="tensors differ"):
        _assert_same_weights(disturbed.model, plain.model)


def test_score_model_is_what_the_search_scores_with(inputs):
    from cfg.search import objective

    assert objective.score_model is score_model


def test_eval_every_must_be_a_multiple_of_log_every():
    with pytest.raises(
        ParamsError, match=r"train\.eval_every = 25 must be a multiple of train\.log_every = 10"
    ):
        params_from_dict({"train": {"log_every": 10, "eval_every": 25}})
    assert params_from_dict({"train": {"log_every": 10, "eval_every": 0}}).train.eval_every == 0


def _stage(*args: str) -> list[str]:
    return [f"{VENV_BIN}/python", *args]


@pytest.mark.slow
def test_train_stage_writes_the_fid_curve_and_the_same_weights_without_it(project):
    run(_stage("pipelines/prepare.py", "--out", "data/prepared.pt", "--info", "data/prepared.json"), project)
    run(
        _stage(
            "pipelines/classifier.py",
            "--data",
            "data/prepared.pt",
            "--out",
            "models/classifier.pt",
            "--metrics",
            "results/classifier.json",
        ),
        project,
    )
    run(
        _stage(
            "pipelines/reference.py",
            "--data",
            "data/prepared.pt",
            "--classifier",
            "models/classifier.pt",
            "--out",
            "data/reference.pt",
        ),
        project,
    )

    def train(out: str, eval_every: int):
        shrink_params(project / "params.yaml", {"train": {"eval_every": eval_every, "eval_samples": 30}})
        cmd = ["pipelines/train.py", "--p-uncond", "0.1", "--data", "data/prepared.pt", "--out-dir", out]
        return run(
            _stage(*cmd, "--classifier", "models/classifier.pt", "--reference", "data/reference.pt"), project
        )

    scored = train("models/scored", 20)  # steps 30, log_every 10: FIDs at steps 20 and 30 (the last)
    train("models/plain", 0)
    a, _ = load_checkpoint(project / "models" / "scored" / "checkpoint.pt")
    b, _ = load_checkpoint(project / "models" / "plain" / "checkpoint.pt")
    _assert_same_weights(a, b)
    assert not (project / "models" / "plain" / "eval.csv").exists()

    with open(project / "models" / "scored" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["20", "30"]
    assert list(rows[0]) == ["step", "fid_w0", "is_w0", "fid_w0.3", "is_w0.3"]
    assert all(float(r["fid_w0"]) > 0 and float(r["is_w0.3"]) >= 1 for r in rows)
    assert "step 20: fid_w0" in scored.stderr

    con = sqlite3.connect(project / "mlflow.db")
    curve = con.execute("select step, value from metrics where key = 'fid_w0.3' order by step").fetchall()
    assert [s for s, _ in curve] == [20, 30]
    assert [v for _, v in curve] == pytest.approx([float(r["fid_w0.3"]) for r in rows])

    shrink_params(project / "params.yaml", {"train": {"eval_every": 20}})
    cmd = ["pipelines/train.py", "--p-uncond", "0.1", "--data", "data/prepared.pt", "--out-dir", "models/x"]
    missing = run(_stage(*cmd), project, check=False)
    assert missing.returncode != 0 and "needs --classifier and --reference" in missing.stderr
