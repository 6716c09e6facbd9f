"""Guidance methods as a grid axis through the real pipeline: `dvc repro` on a shrunk params.yaml with several
methods (autoguidance with the train_guide stage's guide network among them), the trade-off table, the report's
comparison, the MLflow cells."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .conftest import run, shrink_params
from .test_pipeline_e2e import mlflow_runs

pytestmark = pytest.mark.slow

METHODS = {
    "cfg": {},
    "interval": {"lambda_lo": -3.0, "lambda_hi": 3.0},
    "apg": {"eta": 0.0, "momentum": 0.0},
    "cfgpp": {"method": "cfgpp"},
    "autoguidance": {},
}


def test_every_method_is_swept_over_the_w_grid_with_the_same_noise(project):
    shrink_params(project / "params.yaml", {"train": {"p_uncond": [0.2]}, "sample": {"guidance": METHODS}})
    run(["dvc", "repro"], project)

    table = pd.read_csv(project / "results" / "tradeoff.csv")
    assert table["guidance"].tolist() == [m for m in METHODS for _ in range(3)]
    for _, g in table.groupby("guidance"):
        assert g["w"].tolist() == [-1.0, 0.0, 1.0]
    options = {g: json.loads(o) for g, o in zip(table.guidance, table.guidance_options, strict=True)}
    assert options["interval"] == {"lambda_lo": -3.0, "lambda_hi": 3.0}
    assert options["apg"] == {"eta": 0.0, "momentum": 0.0, "norm_threshold": 2.5}
    # the same noise for every method: at w = 0 the interval method is plain conditional sampling, so its
    # images, hence every metric, equal CFG's; cfgpp renoises with ε(z) there and differs
    at0 = table[table.w == 0.0].set_index("guidance")
    for col in ("fid", "is", "class_acc"):
        assert at0.loc["interval", col] == at0.loc["cfg", col], col
    assert at0.loc["cfgpp", "fid"] != at0.loc["cfg", "fid"]
    # autoguidance at w = 0 is the conditional model alone (its guide is not called), so CFG's cell again; at
    # w = -1 (g = 0) it samples the guide network alone, CFG the model's unconditional branch
    for col in ("fid", "is", "class_acc"):
        assert at0.loc["autoguidance", col] == at0.loc["cfg", col], col
    at_minus1 = table[table.w == -1.0].set_index("guidance")
    assert at_minus1.loc["autoguidance", "fid"] != at_minus1.loc["cfg", "fid"]
    # the guide: one small network of params.yaml's guide section, trained by the train_guide stage
    guide = json.loads((project / "models" / "guide" / "train.json").read_text())
    assert guide["role"] == "guide" and guide["p_uncond"] == 0.0 and guide["train"]["steps"] == 10
    sample_info = json.loads((project / "samples" / "p_uncond=0.2" / "sample.json").read_text())
    assert sample_info["guide_checkpoint"] == "models/guide/checkpoint.pt"

    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["guidance"] == "cfg"
    cfg_rows = table[table.guidance == "cfg"]
    assert metrics["best_fid"] == pytest.approx(cfg_rows.fid.min())  # the headline: the first method
    assert set(metrics["guidance_methods"]) == {
        "cfg p_uncond=0.2",
        "interval lambda_hi=3 lambda_lo=-3 p_uncond=0.2",
        "apg eta=0 momentum=0 norm_threshold=2.5 p_uncond=0.2",
        "cfgpp p_uncond=0.2",
        "autoguidance p_uncond=0.2",
    }
    for m in metrics["guidance_methods"].values():
        if len(m["degenerate_w"]) == 3:  # the tiny models' cells are near chance: no frontier, no hypervolume
            assert m["hypervolume"] is None and m["best_fid_sd"] is None
        else:
            assert 0 <= m["hypervolume"] <= 1 and m["best_fid_sd"] is not None
    report = (project / "results" / "report.md").read_text()
    assert "## Guidance methods" in report and "hypervolume" in report
    assert (project / "results" / "plots" / "methods.png").stat().st_size > 1000

    runs = mlflow_runs(project / "mlflow.db")
    cells = runs[runs["tags.run_kind"] == "cell"]
    assert len(cells) == 15
    assert sorted(cells["tags.guidance"].unique()) == sorted(METHODS)
    # params carry the method and its options, and the run name the method
    row = cells[(cells["params.guidance"] == "interval") & (cells["params.w"].astype(float) == 1.0)].iloc[0]
    assert "interval" in row["name"] and "w=1" in row["name"]
    assert json.loads(row["params.guidance_options"]) == {"lambda_hi": 3.0, "lambda_lo": -3.0}

    # the guide's training run: logged like a model's, named as the guide, under the study
    trains = runs[runs["tags.run_kind"] == "train"]
    guide_run = trains[trains["tags.role"] == "guide"]
    assert guide_run["name"].tolist() == ["train guide"]
    assert guide_run["params.model.base_width"].tolist() == ["8"] and guide_run[
        "params.train.steps"
    ].tolist() == ["10"]
    assert guide_run["tags.mlflow.parentRunId"].iloc[0] == runs.index[runs["tags.run_kind"] == "study"][0]
    assert guide_run["status"].tolist() == ["FINISHED"] and guide_run["latest_metrics.loss"].notna().all()
