"""The real pipeline end to end: `dvc repro` on a shrunk params.yaml in a temporary copy, a real MLflow store."""

from __future__ import annotations

import json
import re
import sqlite3

import pandas as pd
import pytest
import yaml

from .conftest import run, shrink_params

pytestmark = pytest.mark.slow


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def mlflow_runs(db) -> pd.DataFrame:
    """All runs of the store with their params, metrics (latest) and tags, read straight from SQLite."""
    con = sqlite3.connect(db)
    runs = pd.read_sql("select run_uuid, name, status from runs", con).set_index("run_uuid")
    for table, col in (("params", "value"), ("tags", "value"), ("latest_metrics", "value")):
        kv = pd.read_sql(f"select run_uuid, key, {col} from {table}", con)
        wide = kv.pivot(index="run_uuid", columns="key", values=col).add_prefix(f"{table}.")
        runs = runs.join(wide)
    return runs


def test_repro_no_op_w_grid_mlflow_and_invalid_params(project):
    first = run(["dvc", "repro"], project)
    assert {
        "prepare",
        "classifier",
        "reference",
        "train@0.1",
        "train@0.5",
        "train_guide",
        "sample@0.1",
        "sample@0.5",
        "evaluate",
        "report",
    } <= stages_run(first.stdout)

    # the trade-off table: every (p_uncond, w) cell with its provenance
    table = pd.read_csv(project / "results" / "tradeoff.csv")
    assert sorted(zip(table.p_uncond, table.w, strict=True)) == [
        (p, w) for p in (0.1, 0.5) for w in (-1.0, 0.0, 1.0)
    ]
    for col in (
        "fid",
        "is",
        "kid_x1e3",
        "kid_x1e3_std",
        "precision",
        "recall",
        "class_acc",
        "n_samples",
        "sampler",
        "steps",
        "checkpoint",
        "fingerprint",
        "fid_range_std",
        "is_range_std",
    ):
        assert col in table and table[col].notna().all(), col
    assert (table.n_samples == 40).all() and (table.fid >= 0).all()
    assert ((table["is"] >= 1) & (table["is"] <= 10)).all(), "IS lies in [1, number of classes]"
    assert table.fingerprint.nunique() == 1
    assert "is_std" not in table, "no all-zero column: the IS spread is is_range_std"

    metrics = json.loads((project / "results" / "metrics.json").read_text())
    best = table.loc[table.fid.idxmin()]
    assert metrics["best_fid"] == pytest.approx(best.fid) and metrics["best_fid_w"] == best.w
    assert metrics["max_is"] == pytest.approx(table["is"].max())
    for png in ("tradeoff.png", "samples_p_uncond=0.1.png", "samples_p_uncond=0.5.png"):
        assert (project / "results" / "plots" / png).stat().st_size > 1000
    assert "Trade-off table" in (project / "results" / "report.md").read_text()
    # no autoguidance in sample.guidance: the guide stage trained nothing and says so
    assert json.loads((project / "models" / "guide" / "guide.json").read_text())["guide"] is None
    assert not (project / "models" / "guide" / "checkpoint.pt").exists()

    # nothing changed: a second repro runs nothing but the hashing of the data's files
    second = run(["dvc", "repro"], project)
    assert stages_run(second.stdout) == {"inputs"}, second.stdout

    # MLflow: one study run (the `dvc repro`) holding one train run per p_uncond and a cell run per (p_uncond, w)
    # with params, metrics and tags, each linked to its model's train run
    runs = mlflow_runs(project / "mlflow.db")
    (study,) = runs.index[runs["tags.run_kind"] == "study"]
    train = runs[runs["tags.run_kind"] == "train"]
    cells = runs[runs["tags.run_kind"] == "cell"]
    assert sorted(train["params.p_uncond"].astype(float)) == [0.1, 0.5]
    assert (train["tags.mlflow.parentRunId"] == study).all()
    assert len(cells) == 6
    parents = {row["params.p_uncond"]: run_id for run_id, row in train.iterrows()}  # p_uncond -> train run
    for _, cell in cells.iterrows():
        assert cell["tags.mlflow.parentRunId"] == study
        assert cell["tags.model_run_id"] == parents[cell["params.p_uncond"]]
        assert cell["latest_metrics.fid"] >= 0 and cell["latest_metrics.is"] >= 1
        assert len(cell["tags.git_commit"]) >= 40 and cell["tags.dvc_stage"] == "evaluate"
        assert cell["tags.params_hash"]
    assert (project / "mlartifacts").is_dir()

    # a new w grid reruns sampling, evaluation and report only
    shrink_params(project / "params.yaml", {"sample": {"w": [-1.0, 0.0, 0.5, 2.0]}})
    third = run(["dvc", "repro"], project)
    assert stages_run(third.stdout) == {"inputs", "sample@0.1", "sample@0.5", "evaluate", "report"}, (
        third.stdout
    )
    assert len(pd.read_csv(project / "results" / "tradeoff.csv")) == 8

    # an invalid parameter stops before any work, names key, value and range, and leaves outputs untouched
    before = (project / "results" / "tradeoff.csv").read_bytes()
    ckpt = (project / "models" / "p_uncond=0.1" / "checkpoint.pt").read_bytes()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["p_uncond"] = [0.1, 1.5]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = run(["dvc", "repro"], project, check=False)
    assert bad.returncode != 0
    assert (
        "train.p_uncond[1] = 1.5 is out of range: allowed value >= 0 and value <= 1"
        in bad.stdout + bad.stderr
    )
    assert (project / "results" / "tradeoff.csv").read_bytes() == before
    assert (project / "models" / "p_uncond=0.1" / "checkpoint.pt").read_bytes() == ckpt


# `dvc exp run --temp` logging to the workspace's store: tests/test_analysis.py's tiny study (one repro for both)
