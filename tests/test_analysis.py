"""analysis/: the tidy run table, frontiers, the paper comparison, the plots and the notebook.

Fast tests build their inputs by hand (raw MLflow rows, `dvc exp show` JSON, trade-off curves) and check the
frontier maths against closed forms and the paper's own published conclusions. Slow tests run the real tiny
pipeline once per session (`tiny_study`, shared with tests/test_mlflow_server.py) and execute the notebook.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from io import StringIO
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import tradeoff as T
from analysis.loaders import _grid_columns
from analysis.notebook import NOTEBOOK, execute, inject_parameters, png_outputs
from cfg.eval.fingerprint import Fingerprint, FingerprintMismatch
from cfg.study import plots
from cfg.study.records import CELL_KEY, CellRecord, options_json, p_uncond_name, write_cells

from .conftest import ROOT, TINY, run, shrink_params

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FP = Fingerprint(
    extractor="classifier", weights_hash="aa", reference_hash="rr", n_samples=40, resolution=28, resize="none"
)
SAMPLER_OPTIONS = {"v": 0.3, "clip_denoised": 1.0}


def record(p_uncond: float, w: float, fid: float, is_: float, run_id: str | None, **kw) -> CellRecord:
    """A cell record of the tiny study's settings with the metrics the analysis reads."""
    metrics = {
        "fid": fid,
        "is": is_,
        "kid_x1e3": fid * 10,
        "kid_x1e3_std": 1.0,
        "fid_range_std": 0.05,
    }
    fields = dict(
        p_uncond=p_uncond,
        w=w,
        guidance="cfg",
        guidance_options={},
        sampler="ancestral",
        sampler_options=SAMPLER_OPTIONS,
        steps=6,
        seed=1,
        n_samples=40,
        extractor="classifier",
        metrics=metrics,
        fingerprint="fp1",
        fingerprint_detail=FP.to_dict(),
        checkpoint=f"models/{p_uncond_name(p_uncond)}/checkpoint.pt",
        train_run_id="t1",
        mlflow_run_id=run_id,
    )
    return CellRecord(**fields | kw)


def table(records: list[CellRecord]) -> pd.DataFrame:
    """results/tradeoff.csv of `records` as the report stage writes it (`CellRecord.row`) and pandas reads it."""
    return pd.read_csv(StringIO(pd.DataFrame([r.row() for r in records]).to_csv(index=False)))


def study(
    curves: dict[float, list[tuple[float, float, float]]], fingerprint: str = "fp1", **extra
) -> pd.DataFrame:
    """A one-study tidy frame from {p_uncond: [(w, fid, is), ...]}: the records' rows, typed as loaded."""
    records = [
        record(p, w, f, i, f"{fingerprint}-{p}-{w}", fingerprint=fingerprint)
        for p, pts in curves.items()
        for w, f, i in pts
    ]
    df = T.type_cells(table(records).rename(columns={"mlflow_run_id": "run_id"})).assign(**extra)
    df["start_time"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(len(df)), unit="s")
    return df


# ---------------------------------------------------------------------------------------------------------
# Loading


def cell_run(rec: CellRecord) -> dict:
    """A finished cell run as mlflow_frame returns it: what tracking.log_cell logs for `rec`, as text."""
    return {
        "run_id": rec.mlflow_run_id,
        "run_name": rec.name,
        "status": "FINISHED",
        "start_time": pd.Timestamp("2026-01-01"),
        "tags.run_kind": "cell",
        "tags.mlflow.parentRunId": rec.train_run_id,
        "tags.fingerprint": rec.fingerprint,
        "tags.git_commit": "abc",
        "tags.params_hash": "h1",
        **{f"tags.fingerprint.{k}": str(v) for k, v in rec.fingerprint_detail.items()},
        **{f"params.{k}": str(v) for k, v in rec.params().items()},
        **{f"metrics.{k}": v for k, v in rec.metrics.items()},
        **{f"metrics.fid_class_{c}": v for c, v in (rec.per_class_fid or {}).items()},
    }


def raw_mlflow() -> pd.DataFrame:
    """What mlflow_frame returns for one train run, two finished cells, a crashed cell and a report run."""
    base = {"status": "FINISHED", "start_time": pd.Timestamp("2026-01-01")}
    train = base | {
        "run_id": "t1",
        "run_name": "train p_uncond=0.1",
        "tags.run_kind": "train",
        "params.p_uncond": "0.1",
        "params.train.steps": "30",
        "params.train.bf16": "True",
        "params.model.channel_mult": "[1, 2]",
        "metrics.loss": 0.4,
    }
    crashed = cell_run(record(0.1, 2.0, 5.0, 4.0, "c3")) | {"run_name": "crashed", "status": "RUNNING"}
    crashed = {k: v for k, v in crashed.items() if not k.startswith("metrics.")}
    cells = [
        cell_run(record(0.1, 0.0, 3.0, 2.0, "c1")),
        cell_run(record(0.1, 1.0, 4.0, 3.0, "c2", per_class_fid={"0": 9.0})),
        crashed,
    ]
    report = base | {"run_id": "r1", "run_name": "report", "tags.run_kind": "report", "metrics.best_fid": 3.0}
    return pd.DataFrame([train, *cells, report])


def test_tidy_mlflow_types_params_and_joins_the_train_run():
    df = T.tidy_mlflow(raw_mlflow())
    assert df["run_id"].tolist() == ["c1", "c2"], "only finished cell runs"
    assert df["w"].tolist() == [0.0, 1.0] and df["w"].dtype == float
    assert (
        df["steps"].dtype == "Int64"
        and df["seed"].tolist() == [1, 1]
        and df["guidance"].tolist() == ["cfg"] * 2
    )
    # options: one canonical JSON string each (the key), and one typed column per option
    assert df["sampler_options"].tolist() == ['{"clip_denoised": 1.0, "v": 0.3}'] * 2
    assert (
        df["sampler_options.v"].tolist() == [0.3, 0.3]
        and df["sampler_options.clip_denoised"].tolist() == [1.0] * 2
    )
    assert (
        df["guidance_options"].tolist() == ["{}"] * 2
        and not df.columns.str.startswith("guidance_options.").any()
    )
    assert (
        df["fingerprint.n_samples"].tolist() == [40, 40] and df["fingerprint.resize"].tolist() == ["none"] * 2
    )
    assert df["fid"].tolist() == [3.0, 4.0] and df["fid_class_0"].isna().tolist() == [True, False]
    assert df["fingerprint"].tolist() == ["fp1", "fp1"] and df["train_run_id"].tolist() == ["t1", "t1"]
    # the train run's params, typed; other run kinds' params and metrics stay out
    assert df["train.steps"].tolist() == [30, 30] and df["train.bf16"].tolist() == [True, True]
    assert df["model.channel_mult"].tolist() == ["[1, 2]"] * 2
    assert "best_fid" not in df and "loss" not in df
    assert not df.duplicated(T.KEY).any()


def exp_show(tmp_w: list[float]) -> list[dict]:
    """`dvc exp show --json` as DVC 3 writes it: workspace, baseline commit, one experiment."""

    def data(ts, w):
        return {
            "timestamp": ts,
            "params": {
                "params.yaml": {
                    "data": {"train": {"steps": 30}, "sample": {"w": w, "sampler_options": {"v": 0.3}}}
                }
            },
            "metrics": {},
        }

    return [
        {"rev": "workspace", "name": None, "data": data(None, [0.0, 1.0]), "experiments": None},
        {
            "rev": "b" * 40,
            "name": "main",
            "data": data("2026-01-01T00:00:00", [0.0, 1.0]),
            "experiments": [
                {
                    "name": "wide-w",
                    "revs": [{"rev": "e" * 40, "name": "wide-w", "data": data("2026-01-02T00:00:00", tmp_w)}],
                }
            ],
        },
    ]


def test_dvc_revisions_and_merge_label_each_mlflow_run_with_its_experiments():
    revs = T.dvc_revisions(exp_show([0.0, 2.0]))
    assert [(r["rev"][:1], r["name"]) for r in revs] == [("w", "workspace"), ("b", "main"), ("e", "wide-w")]
    assert revs[2]["params"]["sample.w"] == "[0.0, 2.0]" and revs[2]["params"]["train.steps"] == 30
    assert revs[2]["params"]["sample.sampler_options.v"] == 0.3
    ws = table([record(0.1, 0.0, 3.0, 2.0, "c1"), record(0.1, 1.0, 4.0, 3.0, "c2")])
    exp_table = table([record(0.1, 0.0, 5.0, 2.0, "gone"), record(0.1, 2.0, 6.0, 3.0, None)])
    d = T.tidy_dvc(revs, {"workspace": ws, "b" * 40: ws, "e" * 40: exp_table})
    m = T.tidy_mlflow(raw_mlflow())
    # the same records read from MLflow params and from the CSV table: equal settings, equal types
    settings = [*T.CELL_PARAMS, "sampler_options.v", "sampler_options.clip_denoised"]
    pd.testing.assert_frame_equal(
        d[d["dvc_rev"] == "workspace"].set_index("run_id")[settings], m.set_index("run_id")[settings]
    )
    df = T.merge_sources(m, d)
    by_run = df.set_index("run_id")
    assert by_run.loc["c1", "dvc_exps"] == "main, workspace" and by_run.loc["c1", "in_workspace"]
    assert by_run.loc["c1", "sample.w"] == "[0.0, 1.0]", "params.yaml keys MLflow lacks come from DVC"
    # rows of an experiment whose cell runs are not in the store are kept, labelled as DVC's
    only_dvc = df[df["source"] == "dvc"]
    assert sorted(only_dvc["fid"]) == [5.0, 6.0] and set(only_dvc["dvc_exps"]) == {"wide-w"}
    assert not only_dvc["in_workspace"].any()
    assert not df.duplicated(T.KEY).any()
    assert T.select(df, "workspace")["run_id"].tolist() == ["c1", "c2"]
    assert T.select(df, "wide-w")["fid"].tolist() == [5.0, 6.0]
    assert T.select(df, "bbbbbbb")["run_id"].tolist() == ["c1", "c2"], "a revision prefix selects too"
    with pytest.raises(ValueError, match="known: \\['main', 'wide-w', 'workspace'\\]"):
        T.select(df, "nope")


def test_select_latest_takes_the_newest_batch_and_the_newest_row_per_cell():
    old = study({0.1: [(0.0, 5.0, 2.0), (1.0, 6.0, 3.0)]}, params_hash="h1", git_commit="a")
    new = study({0.1: [(0.0, 4.0, 2.0), (1.0, 5.0, 3.0)]}, params_hash="h2", git_commit="a")
    new["start_time"] += pd.Timedelta("1D")
    rerun = new.iloc[[0]].assign(
        fid=3.5, run_id="rerun", start_time=new["start_time"].max() + pd.Timedelta("1s")
    )
    df = pd.concat([old, new, rerun], ignore_index=True)
    latest = T.select(df, "latest")
    assert latest["fid"].tolist() == [3.5, 5.0]
    assert T.select(df.assign(in_workspace=False))["fid"].tolist() == [3.5, 5.0], "no workspace table: latest"


def test_columns_follow_the_cell_record():
    rec = record(0.1, 0.0, 3.0, 2.0, "c1")
    assert list(T.CELL_PARAMS) == list(rec.params()) and T.KEY == ["run_id", *CELL_KEY]
    cols = T.order_columns(study({0.1: [(0.0, 3.0, 2.0)]}, extra=1.0)).columns.tolist()
    # CellRecord.row()'s order: settings, its metrics, then the rest; each option column before its options
    assert cols[:4] == ["run_id", "p_uncond", "w", "guidance"]
    assert cols[4 : 4 + len(rec.metrics) + 1] == [*rec.metrics, "extra"]
    at = cols.index("sampler_options")
    assert cols[at : at + 3] == ["sampler_options", "sampler_options.clip_denoised", "sampler_options.v"]


def test_options_are_part_of_the_cell_key():
    a = study({0.1: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0)]})
    b = a.assign(sampler_options=options_json({"v": 1.0}), fid=a["fid"] + 1)
    b["start_time"] += pd.Timedelta("1D")
    both = T.type_cells(pd.concat([a, b], ignore_index=True))
    assert both["sampler_options.v"].tolist() == [0.3, 0.3, 1.0, 1.0]
    assert both["sampler_options.clip_denoised"].isna().tolist() == [False, False, True, True]
    assert len(T.select(both, "latest", fingerprint="fp1")) == 4, "v = 0.3 and v = 1 are different cells"
    assert "sampler_options.clip_denoised" not in T.type_cells(b), "an option no row has is no column"


def test_cell_records_are_read_through_the_record_type(tmp_path):
    write_cells(
        tmp_path / "p_uncond=0.1.json", [record(0.1, 0.0, 3.0, 2.0, "c1"), record(0.1, 1.0, 4.0, 3.0, None)]
    )
    (tmp_path / "p_uncond=0.5.json").write_text(json.dumps([{"p_uncond": 0.5, "v": 0.3}]))
    with pytest.warns(
        UserWarning, match="p_uncond=0.5.json is not a cell-record file.*unknown fields \\['v'\\]"
    ):
        detail = T.cell_records(tmp_path)
    assert detail["run_id"].tolist() == ["c1"], "records without an MLflow run have nothing to label"
    assert detail.iloc[0].drop("run_id").to_dict() == {f"fingerprint.{k}": v for k, v in FP.to_dict().items()}


@pytest.mark.parametrize("p_uncond", [0.1, 1.0])
def test_sample_grid_image_of_the_workspace_is_found_by_p_uncond_name(tmp_path, p_uncond):
    from PIL import Image

    folder = tmp_path / "samples" / p_uncond_name(p_uncond)
    folder.mkdir(parents=True)
    Image.fromarray(np.full((8, 16), 7, dtype=np.uint8)).save(folder / "grid.png")
    (folder / "sample.json").write_text(json.dumps({"w": [1, 0]}))
    one = study({p_uncond: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0)]}, in_workspace=True)
    image, w = T.sample_grid_image(one, np.float64(p_uncond), tmp_path)
    assert image.shape == (8, 16) and (image == 7).all() and w == [1.0, 0.0]
    with pytest.raises(ValueError, match="no rows with p_uncond=0.3; the study has \\[" + f"{p_uncond}\\]"):
        T.sample_grid_image(one, 0.3, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Projects whose store has no cell runs, experiment names, several guidance methods


def dvc_project(root: Path, tradeoff: pd.DataFrame, experiment: str = "cfg-lab") -> Path:
    """A git + DVC project with `tradeoff` as its committed results/tradeoff.csv and tracking.experiment set,
    as a clone that only did `git pull && dvc pull` has it: no MLflow store."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"experiment": experiment}}))
    (root / "results").mkdir()
    tradeoff.to_csv(root / "results" / "tradeoff.csv", index=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "-c", "init.defaultBranch=main", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run([*git, "add", "-A"], root)
    run([*git, "commit", "-qm", "study"], root)
    return root


def log_study(client, experiment: str, records: list[CellRecord]) -> list[str]:
    """Log `records` into `experiment` of a real MLflow store as the pipeline does (a train run per p_uncond, a
    FINISHED cell run under it with the record's params, metrics and tags: `cell_run`); the cell run ids."""
    from mlflow.entities import Metric, Param, RunTag

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    trains, ids = {}, []
    for rec in records:
        if rec.p_uncond not in trains:
            train = client.create_run(exp_id, tags={"run_kind": "train"}, run_name=f"train {rec.p_uncond}")
            client.log_param(train.info.run_id, "train.steps", "30")
            client.set_terminated(train.info.run_id)
            trains[rec.p_uncond] = train.info.run_id
        row = cell_run(rec) | {"tags.mlflow.parentRunId": trains[rec.p_uncond]}
        cell = client.create_run(exp_id, run_name=rec.name)
        client.log_batch(
            cell.info.run_id,
            metrics=[Metric(k[8:], v, 0, 0) for k, v in row.items() if k.startswith("metrics.")],
            params=[Param(k[7:], v) for k, v in row.items() if k.startswith("params.")],
            tags=[RunTag(k[5:], str(v)) for k, v in row.items() if k.startswith("tags.")],
        )
        client.set_terminated(cell.info.run_id)
        ids.append(cell.info.run_id)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A real SQLite MLflow store: experiment `other` holds the cells of p_uncond 0.1 (w 0, 1), `cfg-lab` one
    cell of p_uncond 0.5."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    log_study(client, "other", [record(0.1, 0.0, 3.0, 2.0, None), record(0.1, 1.0, 4.0, 3.0, None)])
    log_study(client, "cfg-lab", [record(0.5, 0.0, 7.0, 1.0, None)])
    return uri


@pytest.mark.parametrize("case", ["no store", "no such experiment"])
def test_load_runs_without_cell_runs_in_the_store_reads_the_dvc_tables_typed(
    tmp_path, store, case, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = [record(p, w, 3.0 + w + p, 2.0 + w, f"r-{p}-{w}") for p in (0.1, 0.5) for w in (0.0, 1.0, 2.0)]
    project = dvc_project(tmp_path / "clone", table(records))
    uri = None if case == "no store" else store  # None: the project's sqlite:///<project>/mlflow.db, absent
    with pytest.warns(
        UserWarning, match="no MLflow store" if case == "no store" else "no experiment 'absent'"
    ):
        runs = T.load_runs(uri, project, "absent")
    assert len(runs) == 6 and (runs["source"] == "dvc").all() and runs["in_workspace"].all()
    assert set(runs["dvc_exps"]) == {"main, workspace"}, "the committed table and the workspace's"
    # the cell settings typed as from MLflow (an empty MLflow frame's object columns must not untype them)
    assert runs["p_uncond"].dtype == float and runs["w"].dtype == float and runs["n_samples"].dtype == "Int64"
    assert runs["fid"].dtype == float and runs["sampler_options.v"].tolist() == [0.3] * 6
    assert "train_run_id" in runs, "the MLflow frame's columns stay (the notebook counts trained models)"
    study = T.select(runs)
    assert study["run_id"].tolist() == [r.mlflow_run_id for r in records]
    plt.close(plots.tradeoff_figure(study))  # the notebook's first figure: np.isfinite of those columns


def test_load_runs_defaults_to_the_projects_tracking_experiment(tmp_path, store):
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"tracking": {"experiment": "other"}}))
    runs = T.load_runs(store, project, dvc=False)
    assert runs["p_uncond"].tolist() == [0.1, 0.1] and runs["w"].tolist() == [0.0, 1.0]
    assert runs["fid"].tolist() == [3.0, 4.0] and runs["train.steps"].tolist() == [30, 30]
    assert T.load_runs(store, project, "cfg-lab", dvc=False)["p_uncond"].tolist() == [0.5]
    assert T.default_experiment(project) == "other" and T.default_experiment(tmp_path) == "cfg-lab"
    # the notebook takes it from the project too, unless EXPERIMENT is set (cfg-lab notebook --experiment)
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    defaults: dict = {}
    exec(next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source, {}, defaults)
    assert defaults["EXPERIMENT"] is None
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "experiment = EXPERIMENT or T.default_experiment(project)" in code
    assert "T.load_runs(uri, project, experiment)" in code


def test_select_matches_experiment_names_exactly_and_revision_prefixes_unambiguously():
    wide = [record(0.1, w, 3.0 + w, 2.0, f"a{w}") for w in (0.0, 1.0, 2.0, 4.0)]
    wide_w = [record(0.1, w, 103.0 + w, 2.0, f"b{w}") for w in (0.0, 1.0)]
    revs = [
        {"rev": "abc1" + "0" * 36, "name": "wide", "timestamp": "2026-01-01T00:00:00", "params": {}},
        {"rev": "abc2" + "0" * 36, "name": "wide-w", "timestamp": "2026-01-02T00:00:00", "params": {}},
    ]
    d = T.tidy_dvc(revs, {revs[0]["rev"]: table(wide), revs[1]["rev"]: table(wide_w)})
    df = T.merge_sources(pd.DataFrame(columns=["run_id"]), d)
    # `wide` is not a prefix of the names it selects: the newer `wide-w` may not replace its cells
    got = T.select(df, "wide")
    assert got["run_id"].tolist() == ["a0.0", "a1.0", "a2.0", "a4.0"] and set(got["dvc_exps"]) == {"wide"}
    assert T.select(df, "wide-w")["run_id"].tolist() == ["b0.0", "b1.0"]
    assert T.select(df, "abc1")["run_id"].tolist() == got["run_id"].tolist(), "a revision prefix selects"
    assert T.select(df, revs[1]["rev"])["run_id"].tolist() == ["b0.0", "b1.0"], "so does the whole hash"
    with pytest.raises(
        ValueError, match=r"revision prefix 'abc' is ambiguous: abc10+ \(wide\); abc20+ \(wide-w\)"
    ):
        T.select(df, "abc")
    with pytest.raises(
        ValueError, match=r"no rows of DVC experiment or revision 'wid'; known: \['wide', 'wide-w'\]"
    ):
        T.select(df, "wid")


def test_a_study_of_several_guidance_methods_is_analysed_on_one_methods_curves():
    # the committed guidance-methods study as load_runs reads it from a DVC revision's table
    t = pd.read_csv(ROOT / "docs" / "results" / "guidance_methods_digits" / "tradeoff.csv")
    ws = {"rev": "workspace", "name": "workspace", "timestamp": None, "params": {}}
    study = T.select(T.merge_sources(pd.DataFrame(columns=["run_id"]), T.tidy_dvc([ws], {"workspace": t})))
    assert len(study) == 81 and study["guidance"].nunique() == 9  # one row per (p_uncond, w, method)
    # the p_uncond curves of several methods at once mean nothing: refused, naming the methods and the way out
    for analyse in (T.frontiers, T.curve_shapes, T.compare_to_paper, T.narrative):
        with pytest.raises(
            ValueError, match=r"9 guidance methods \(cfg, .*rescale phi=0.7.*method_rows\(df, 'cfg'\)"
        ):
            analyse(study)
    curves = T.method_rows(study)  # cfg, the paper's method
    assert len(curves) == 9 and (curves["guidance"] == "cfg").all() and curves.attrs["method"] == "cfg"
    assert len(curves.attrs["methods"]) == 9 and "rescale phi=0.7" in curves.attrs["methods"]
    fronts = T.frontiers(curves)
    assert fronts["pareto"].any() and not fronts.duplicated(["p_uncond", "w"]).any()
    shapes = T.curve_shapes(curves)
    assert shapes.loc[0.2, "best_fid_w"] == 0.2 and shapes.loc[0.2, "best_fid"] == pytest.approx(
        8.388, abs=1e-3
    )
    assert T.compare_to_paper(curves).loc[0.2, "best_fid_w_ours"] == 0.2
    assert "guidance `cfg`" in T.narrative(curves)
    rescale = T.method_rows(study, "rescale phi=0.7")
    assert len(rescale) == 9 and T.curve_shapes(rescale).loc[0.2, "best_fid_w"] == 0.2
    with pytest.raises(ValueError, match="no rows of guidance method 'rescale'; the frame has \\['cfg'"):
        T.method_rows(study, "rescale")
    others = study[study["guidance"].isin(["rescale", "apg"])]
    with pytest.raises(ValueError, match="2 guidance methods and no 'cfg' among them"):
        T.method_rows(others)
    one = study[study["guidance"] == "apg"]
    assert T.method_rows(one).attrs["method"] == "apg eta=0 momentum=-0.75 norm_threshold=2.5"


def test_a_missing_fid_is_never_the_best_cell_and_is_named():
    curve = [(0.0, 5.0, 2.0), (0.2, 3.0, 3.0), (0.5, np.nan, 4.0), (1.0, 4.0, 5.0), (2.0, 6.0, 6.0)]
    df = study({0.1: curve, 0.5: [(w, f + 1.0, i) for w, f, i in curve if np.isfinite(f)]})
    shapes = T.curve_shapes(df)
    s = shapes.loc[0.1]
    assert (s["best_fid"], s["best_fid_w"]) == (3.0, 0.2), "the measured minimum, not the NaN"
    assert s["fid_u_shaped"] and s["fid_missing_w"] == [0.5] and s["is_missing_w"] == []
    assert shapes.loc[0.5, "fid_missing_w"] == [] and shapes.loc[0.5, "best_fid_w"] == 0.2
    fronts = T.frontiers(df)
    assert not fronts.loc[fronts["fid"].isna(), "pareto"].any(), "a cell without FID is on no front"
    assert shapes["hypervolume"].notna().all() and shapes["rank"].notna().all()
    text = T.narrative(df)
    assert "w = 0.2 for p_uncond 0.1 (inside the grid, U-shaped)" in text
    assert "- Missing (left out of the shapes and fronts): FID at w = 0.5 for p_uncond 0.1." in text
    assert "nan" not in text.lower()


# ---------------------------------------------------------------------------------------------------------
# Comparability: labelled when loaded, refused when compared


def test_mixed_fingerprints_are_refused_naming_the_differing_fields():
    a = study({0.1: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0)]}, "fp1")
    b = study({0.5: [(0.0, 3.5, 2.0), (1.0, 4.5, 2.5)]}, "fp2")
    for col, va, vb in (("extractor", "classifier", "classifier"), ("n_samples", 40, 400)):
        a[f"fingerprint.{col}"], b[f"fingerprint.{col}"] = va, vb
    for col in ("weights_hash", "reference_hash", "resolution", "resize"):
        a[f"fingerprint.{col}"] = b[f"fingerprint.{col}"] = "same"
    mixed = pd.concat([a, b], ignore_index=True)
    groups = T.fingerprint_groups(mixed)
    assert groups["cells"].to_dict() == {"fp1": 2, "fp2": 2}
    for compare in (T.frontiers, T.rank_frontiers, T.curve_shapes, T.narrative, T.require_comparable):
        with pytest.raises(FingerprintMismatch, match="n_samples differs: \\[40, 400\\]") as e:
            compare(mixed)
        assert e.value.fields == ["n_samples"]
    assert T.select(mixed, "latest", fingerprint="fp1")["fingerprint"].unique().tolist() == ["fp1"]
    with pytest.raises(FingerprintMismatch, match="2 metric fingerprints among 4 rows"):
        T.require_comparable(mixed.drop(columns=[c for c in mixed if c.startswith("fingerprint.")]))
    with pytest.raises(FingerprintMismatch, match="without a metric fingerprint"):
        T.require_comparable(a.assign(fingerprint=None))


def test_several_rows_per_cell_must_be_narrowed_first():
    df = study({0.1: [(0.0, 3.0, 2.0), (0.0, 3.1, 2.1), (1.0, 4.0, 3.0)]})
    with pytest.raises(ValueError, match="several rows for the same \\(p_uncond, w\\)"):
        T.frontiers(df)


# ---------------------------------------------------------------------------------------------------------
# Frontier maths against closed forms


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    fid, is_ = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)
    expected = [
        not any(
            fid[j] <= fid[i] and is_[j] >= is_[i] and (fid[j] < fid[i] or is_[j] > is_[i]) for j in range(40)
        )
        for i in range(40)
    ]
    assert T.pareto_mask(fid, is_).tolist() == expected
    assert T.pareto_mask([1.0, 1.0], [2.0, 2.0]).tolist() == [True, True], "ties dominate nothing"


def test_hypervolume_and_frontier_fid_closed_forms():
    # one point: the rectangle up to the reference point
    assert T.hypervolume(np.array([1.0]), np.array([3.0]), ref_fid=4.0, ref_is=1.0) == pytest.approx(6.0)
    # two points (IS 2, FID 1) and (IS 4, FID 3) up to (IS 0, FID 5): 2*4 + 2*2 = 12
    assert T.hypervolume(np.array([1.0, 3.0]), np.array([2.0, 4.0]), 5.0, 0.0) == pytest.approx(12.0)
    # a straight front FID = IS over IS 1..3 has mean FID 2 there; outside its span: NaN
    assert T.frontier_fid(np.array([1.0, 3.0]), np.array([1.0, 3.0]), 1.0, 3.0) == pytest.approx(2.0)
    assert np.isnan(T.frontier_fid(np.array([1.0, 3.0]), np.array([1.0, 3.0]), 0.5, 3.0))


def test_dominated_curve_ranks_last():
    good = [(0.0, 2.0, 10.0), (1.0, 3.0, 20.0), (2.0, 5.0, 30.0)]
    bad = [(w, f + 1.0, i) for w, f, i in good]  # the same IS at one FID more
    r = T.rank_frontiers(study({0.1: good, 0.5: bad}))
    assert r["rank"].to_dict() == {0.1: 1, 0.5: 2}
    assert r.loc[0.5, "frontier_fid"] == pytest.approx(r.loc[0.1, "frontier_fid"] + 1.0)
    assert r.loc[0.5, "dominated_share"] == 1.0 and r.loc[0.1, "dominated_share"] == 0.0
    assert r.loc[0.1, "hypervolume"] > r.loc[0.5, "hypervolume"]


# ---------------------------------------------------------------------------------------------------------
# Shapes and the paper


def test_paper_table1_reproduces_the_papers_own_conclusions():
    paper = T.paper_table1()
    shapes = T.curve_shapes(paper)
    # README: FID is U-shaped in w, best 1.55 at w = 0.1, p_uncond = 0.1; IS rises with w; 0.5 is the worst frontier
    assert shapes["best_fid_w"].tolist() == [0.1, 0.1, 0.1] and shapes["fid_u_shaped"].all()
    assert shapes.loc[0.1, "best_fid"] == 1.55 and shapes["is_monotonic"].all()
    assert shapes["rank"].idxmax() == 0.5
    cmp = T.compare_to_paper(paper, paper)
    assert cmp.attrs["rank_agreement"] == pytest.approx(1.0)
    assert (cmp["best_fid_w_ours"] == cmp["best_fid_w_paper"]).all()


def test_compare_to_paper_finds_a_different_shape():
    # FID falling all the way (minimum at the grid's edge), IS dropping at w = 2, and p_uncond 0.5 ranked first
    ours = study(
        {
            0.1: [(0.0, 9.0, 10.0), (1.0, 8.0, 20.0), (2.0, 7.0, 15.0)],
            0.5: [(0.0, 6.0, 10.0), (1.0, 5.0, 20.0), (2.0, 4.0, 25.0)],
        }
    )
    cmp = T.compare_to_paper(ours)
    assert cmp.attrs["shared_w"] == [0.0, 1.0, 2.0]
    assert cmp.loc[[0.1, 0.5], "best_fid_w_ours"].tolist() == [2.0, 2.0]
    assert cmp.loc[[0.1, 0.5], "best_fid_w_paper"].tolist() == [0.0, 0.0], "paper on the shared grid 0, 1, 2"
    assert cmp.loc[0.1, "is_monotonic_ours"] == False and cmp.loc[0.1, "is_monotonic_paper"] == True  # noqa: E712
    assert cmp.attrs["rank_agreement"] == pytest.approx(-1.0)
    text = T.narrative(ours)
    assert "w = 2 for p_uncond 0.1 (at the edge of the grid)" in text
    assert "it falls for 0.1 (w 1->2)" in text
    assert "Frontier ranking: 0.5" in text
    assert "p_uncond ranked by frontier: paper 0.1 > 0.5; ours 0.5 > 0.1 (Kendall tau -1.00)" in text


def test_narrative_of_the_paper_tells_its_story():
    text = T.narrative(T.paper_table1().assign(n_samples=50000))
    assert text.startswith("- **Best FID 1.55** at w = 0.1, p_uncond = 0.1 (42 cells, 50000 samples each")
    assert "IS rises monotonically with w for every p_uncond." in text
    assert "w = 0.1 for p_uncond 0.5 (inside the grid, U-shaped)" in text
    assert "Frontier ranking: 0.1" in text and "> 0.5 (" in text


@pytest.mark.parametrize(
    "curves, expected",
    [
        (
            {0.1: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0), (2.0, 6.0, 2.5)]},
            "p_uncond ranked by frontier: paper 0.2 > 0.1",
        ),
        # both points on the joint front: ideal (FID 3, IS 3), nadir (4, 2), one w -> the reference a whole span
        # beyond the nadir, (5, 1); box 2 x 2, each point dominates 1 x 2 or 2 x 1 of it: 0.50 each
        ({0.1: [(1.0, 3.0, 2.0)], 0.5: [(1.0, 4.0, 3.0)]}, "Frontier ranking: 0.1 (0.50) = 0.5 (0.50)"),
        (
            {0.1: [(5.0, 3.0, 2.0), (6.0, 4.0, 3.0)]},
            "each on its own w grid (they share fewer than two w values)",
        ),
        ({0.3: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0)], 0.7: [(0.0, 3.5, 2.0)]}, "ours 0.3 > 0.7"),
    ],
    ids=["one p_uncond", "one w", "no shared w", "p_uncond not in the paper"],
)
def test_narrative_of_odd_studies(curves, expected):
    text = T.narrative(study(curves).assign(fid_range_std=np.nan))
    assert expected in text and "nan" not in text.lower()


# ---------------------------------------------------------------------------------------------------------
# Plots (cfg/study/plots.py) and the notebook's plumbing


def test_plots_draw_every_panel():
    df = study(
        {0.1: [(0.0, 3.0, 2.0), (1.0, 4.0, 3.0), (2.0, 6.0, 2.5)], 0.5: [(0.0, 3.5, 1.5), (1.0, 4.5, 2.5)]}
    )
    fig, axes = plt.subplots(1, 4)
    plots.metric_with_uncertainty(axes[0], df, "fid")
    assert len(axes[0].collections) >= 2, "error bars and shaded bands"
    plots.pareto_frontier(axes[1], T.frontiers(df))
    assert {t.get_text() for t in axes[1].texts} == {"0", "1", "2"}, "every point labelled with its w"
    plots.normalised_metric_vs_w(axes[2], df, "fid", reference=T.paper_table1())
    ys = np.concatenate([line.get_ydata() for line in axes[2].lines if len(line.get_ydata()) > 2])
    assert ys.min() == 0.0 and ys.max() == 1.0
    plots.sample_grid(axes[3], np.zeros((30, 40)), [0.0, 1.0], title="grid")
    assert [t.get_text() for t in axes[3].get_xticklabels()] == ["0", "1"]
    with pytest.raises(ValueError, match="no uncertainty column known for 'recall'"):
        plots.metric_with_uncertainty(axes[0], df, "recall")
    plt.close(fig)
    plt.close(plots.uncertainty_figure(df))


def test_sample_grid_columns_are_counted_from_the_tile_borders():
    import torch

    from cfg.data.images import tile_grid

    for w_count in (1, 3, 8):
        tiles = torch.randint(0, 200, (10, w_count, 1, 8, 8), dtype=torch.uint8)
        assert _grid_columns(tile_grid(tiles, upscale=8)) == w_count


def test_notebook_has_parameters_and_valid_cells():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed without outputs"
    inject_parameters(nb, {"PROJECT_DIR": "/x", "SELECT": "latest"})
    inject_parameters(nb, {"PROJECT_DIR": "/y"})
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = tags.index(["parameters"])
    assert tags[at + 1] == ["injected-parameters"] and nb.cells[at + 1].source == "PROJECT_DIR = '/y'"
    assert sum("injected-parameters" in t for t in tags) == 1
    defaults = {}
    exec(nb.cells[at].source, {}, defaults)  # the parameter cell is plain assignments
    assert set(defaults) >= {"TRACKING_URI", "PROJECT_DIR", "EXPERIMENT", "SELECT", "FIGURES_DIR"}
    code = [
        ast.parse("\n".join(line for line in c.source.splitlines() if not line.startswith("%")))
        for c in nb.cells
        if c.cell_type == "code"
    ]
    nodes = [n for tree in code for n in ast.walk(tree)]
    # what it imports exists, and every T.<name> it calls is public in analysis.tradeoff
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}")
    used = {n.attr for n in nodes if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "T"}
    assert {"load_runs", "select", "narrative"} <= used <= set(T.__all__)


# ---------------------------------------------------------------------------------------------------------
# Slow: the real tiny pipeline, shared by this module and test_mlflow_server.py

_STUDY: dict[str, Path] = {}
EXP_W = [-1.0, 0.0, 0.5, 2.0]  # the w grid of the one DVC experiment run on top of the tiny study


def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Once per session: a git + DVC copy of the project (without the workspace's pipeline outputs) with the
    tiny params, `dvc repro`, a commit, and one `dvc exp run --temp` with another w grid."""
    if "dir" in _STUDY:
        return _STUDY["dir"]
    dest = tmp_path_factory.mktemp("study") / "cfg-lab"
    outputs = {"data", "models", "samples", "results", "mlartifacts", "mlflow.db", "dvc.lock"}
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    for rel in files:
        if rel.split("/")[0] not in outputs and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    shrink_params(dest / "params.yaml", TINY)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-qm", "tiny"], dest)
    run(["dvc", "repro"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-qm", "baseline"], dest)
    run(["dvc", "exp", "run", "--temp", "-n", "wide-w", "-S", f"sample.w={json.dumps(EXP_W)}"], dest)
    _STUDY["dir"] = dest
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_study(tmp_path_factory)


@pytest.mark.slow
def test_load_runs_on_the_tiny_pipeline(tiny):
    runs = T.load_runs(project_dir=tiny)
    csv = pd.read_csv(tiny / "results" / "tradeoff.csv")
    n_p, n_w = len(TINY["train"]["p_uncond"]), len(TINY["sample"]["w"])
    assert len(runs) == n_p * (n_w + len(EXP_W)) and not runs.duplicated(T.KEY).any()
    assert (runs["source"] == "mlflow").all() and runs["fingerprint"].nunique() == 1
    # the workspace selection is the report's table, cell for cell
    ws = T.select(runs)
    assert ws["run_id"].tolist() == csv["mlflow_run_id"].tolist()
    np.testing.assert_allclose(ws["fid"], csv["fid"])
    np.testing.assert_allclose(ws["is"], csv["is"])
    # MLflow's params and the table's JSON columns are the same settings
    assert ws["sampler_options"].tolist() == csv["sampler_options"].tolist()
    sampler_options = yaml.safe_load((tiny / "params.yaml").read_text())["sample"]["sampler_options"]
    assert ws["sampler_options.v"].eq(sampler_options["v"]).all()
    assert (
        ws["fingerprint.extractor"].eq("classifier").all()
        and ws["train.steps"].eq(TINY["train"]["steps"]).all()
    )
    # the cells of the `dvc exp run --temp` (run in a copy under .dvc/tmp) landed in the workspace's store, and no
    # store was left in the temporary copy
    exp = T.select(runs, "wide-w")
    assert sorted(exp["w"].unique()) == EXP_W and (exp["dvc_exps"] == "wide-w").all()
    assert len(exp) == n_p * len(EXP_W)
    assert not list((tiny / ".dvc" / "tmp").rglob("mlflow.db")), "no store may be left in a temporary copy"
    assert T.select(runs, "latest")["run_id"].tolist() == exp["run_id"].tolist()
    assert "Best FID" in T.narrative(ws)


def printed(nb) -> str:
    """What an executed notebook's cells printed: streams and markdown displays."""
    return "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/markdown", "")
        for c in nb.cells
        for o in c.get("outputs", [])
    )


@pytest.mark.slow
def test_notebook_runs_headless_on_the_tiny_pipeline(tiny, tmp_path):
    figures = tmp_path / "figures"
    nb = execute({"PROJECT_DIR": str(tiny), "FIGURES_DIR": str(figures)}, out=tmp_path / "executed.ipynb")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    pngs = png_outputs(nb)
    assert len(pngs) >= 4 and all(p.startswith(b"\x89PNG") and len(p) > 5000 for p in pngs)
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "frontiers.png",
        "samples.png",
        "tradeoff.png",
        "uncertainty.png",
    ]
    text = printed(nb)
    assert f"kernel {sys.executable}" in text, "the kernel runs this test's Python"
    assert "Best FID" in text and "Against the paper's Table 1" in text


@pytest.mark.slow
def test_notebook_runs_on_a_dvc_only_study_of_several_guidance_methods(tmp_path, monkeypatch):
    """The committed guidance-methods study as a clone without MLflow store has it (results/ and samples/ from
    DVC), its project's experiment not cfg-lab: every cell runs, the paper cells on the cfg curves."""
    from PIL import Image

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = pd.read_csv(ROOT / "docs" / "results" / "guidance_methods_digits" / "tradeoff.csv")
    project = dvc_project(tmp_path / "methods", t, experiment="other")
    folder = project / "samples" / p_uncond_name(0.2)
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 10 * len(t)), 128, dtype=np.uint8)).save(folder / "grid.png")
    (folder / "sample.json").write_text(json.dumps({"w": t["w"].tolist()}))
    figures = tmp_path / "figures"
    nb = execute({"PROJECT_DIR": str(project), "FIGURES_DIR": str(figures)})
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "frontiers.png",
        "methods.png",
        "samples.png",
        "tradeoff.png",
        "uncertainty.png",
    ]
    text = printed(nb)
    assert "(experiment 'other')" in text, "the project's tracking.experiment"
    assert "the 9 cells of `cfg` (9 methods, 81 cells)" in text
    assert "guidance `cfg`" in text and "Against the paper's Table 1" in text
