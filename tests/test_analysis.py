"""analysis/: the tidy run table, frontiers, the paper comparison, the plots and the notebook.

Fast tests build their inputs by hand (raw MLflow rows, `dvc exp show` JSON, trade-off curves) and check the
frontier maths against closed forms and the paper's own published conclusions. Slow tests run the real tiny
pipeline once per session (`tiny_study`, shared with tests/test_mlflow_server.py) and execute the notebook.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis import tradeoff as T
from analysis.notebook import NOTEBOOK, execute, inject_parameters, png_outputs
from cfg.eval.metrics import FingerprintMismatch
from cfg.study import plots

from .conftest import ROOT, TINY, run, shrink_params

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FP = {"extractor": "classifier", "weights_hash": "aa", "reference_hash": "rr", "n_samples": 40}


def study(
    curves: dict[float, list[tuple[float, float, float]]], fingerprint: str = "fp1", **extra
) -> pd.DataFrame:
    """A one-study frame from {p_uncond: [(w, fid, is), ...]} with the columns the analysis reads."""
    rows = [
        {
            "run_id": f"{fingerprint}-{p}-{w}",
            "p_uncond": p,
            "w": w,
            "fid": f,
            "is": i,
            "fingerprint": fingerprint,
        }
        for p, pts in curves.items()
        for w, f, i in pts
    ]
    df = pd.DataFrame(rows).assign(sampler="ancestral", steps=6, v=0.3, seed=1, n_samples=40, **extra)
    df["start_time"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(len(df)), unit="s")
    for col, scale in (("fid_range_std", 0.05), ("is_std", 0.1), ("kid_std", 0.001)):
        df[col] = scale
    df["kid"] = df["fid"] / 100
    return df


# ---------------------------------------------------------------------------------------------------------
# Loading


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
    cell = base | {
        "tags.run_kind": "cell",
        "tags.mlflow.parentRunId": "t1",
        "tags.fingerprint": "fp1",
        "tags.git_commit": "abc",
        "tags.params_hash": "h1",
        "params.p_uncond": "0.1",
        "params.sampler": "ancestral",
        "params.steps": "6",
        "params.v": "0.3",
        "params.seed": "1",
        "params.extractor": "classifier",
        "params.n_samples": "40",
    }
    cells = [
        cell
        | {"run_id": "c1", "run_name": "cell w=0", "params.w": "0.0", "metrics.fid": 3.0, "metrics.is": 2.0},
        cell
        | {
            "run_id": "c2",
            "run_name": "cell w=1",
            "params.w": "1.0",
            "metrics.fid": 4.0,
            "metrics.is": 3.0,
            "metrics.fid_class_0": 9.0,
        },
        cell | {"run_id": "c3", "run_name": "crashed", "status": "RUNNING", "params.w": "2.0"},
    ]
    report = base | {"run_id": "r1", "run_name": "report", "tags.run_kind": "report", "metrics.best_fid": 3.0}
    return pd.DataFrame([train, *cells, report])


def test_tidy_mlflow_types_params_and_joins_the_train_run():
    df = T.tidy_mlflow(raw_mlflow())
    assert df["run_id"].tolist() == ["c1", "c2"], "only finished cell runs"
    assert df["w"].tolist() == [0.0, 1.0] and df["w"].dtype == float
    assert df["steps"].dtype == "Int64" and df["seed"].tolist() == [1, 1] and df["v"].tolist() == [0.3, 0.3]
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
            "params": {"params.yaml": {"data": {"train": {"steps": 30}, "sample": {"w": w, "v": 0.3}}}},
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
    table = pd.DataFrame(
        {"p_uncond": [0.1, 0.1], "w": [0.0, 1.0], "fid": [3.0, 4.0], "mlflow_run_id": ["c1", "c2"]}
    )
    exp_table = pd.DataFrame(
        {"p_uncond": [0.1, 0.1], "w": [0.0, 2.0], "fid": [5.0, 6.0], "mlflow_run_id": ["gone", None]}
    )
    d = T.tidy_dvc(revs, {"workspace": table, "b" * 40: table, "e" * 40: exp_table})
    df = T.merge_sources(T.tidy_mlflow(raw_mlflow()), d)
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
        ({0.1: [(1.0, 3.0, 2.0)], 0.5: [(1.0, 4.0, 3.0)]}, "Frontier ranking: 0.1 (0.09) = 0.5 (0.09)"),
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
        assert T._grid_columns(tile_grid(tiles, upscale=8)) == w_count


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
    for cell in nb.cells:
        if cell.cell_type == "code":
            ast.parse("\n".join(line for line in cell.source.splitlines() if not line.startswith("%")))


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
    table = pd.read_csv(tiny / "results" / "tradeoff.csv")
    n_p, n_w = len(TINY["train"]["p_uncond"]), len(TINY["sample"]["w"])
    assert len(runs) == n_p * (n_w + len(EXP_W)) and not runs.duplicated(T.KEY).any()
    assert (runs["source"] == "mlflow").all() and runs["fingerprint"].nunique() == 1
    # the workspace selection is the report's table, cell for cell
    ws = T.select(runs)
    assert ws["run_id"].tolist() == table["mlflow_run_id"].tolist()
    np.testing.assert_allclose(ws["fid"], table["fid"])
    np.testing.assert_allclose(ws["is"], table["is"])
    assert (
        ws["fingerprint.extractor"].eq("classifier").all()
        and ws["train.steps"].eq(TINY["train"]["steps"]).all()
    )
    exp = T.select(runs, "wide-w")
    assert sorted(exp["w"].unique()) == EXP_W and (exp["dvc_exps"] == "wide-w").all()
    assert T.select(runs, "latest")["run_id"].tolist() == exp["run_id"].tolist()
    assert "Best FID" in T.narrative(ws)


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
    text = "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/markdown", "")
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    assert f"kernel {sys.executable}" in text, "the kernel runs this test's Python"
    assert "Best FID" in text and "Against the paper's Table 1" in text
