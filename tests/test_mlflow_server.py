"""The MLflow UI's view of a real tiny study: a tracking server on localhost, read back over its REST API.

The UI shows what the runs hold, so the check is on the runs as the server returns them: one study run per DVC
run (the `dvc repro` and the `dvc exp run` of the session's tiny pipeline, tests/test_analysis.py: tiny_study),
every stage's runs nested under it; each cell run named by its p_uncond and w, with the parameters p_uncond and w
and the metrics fid and is, all numbers, linked to the train run of its p_uncond, with MLflow's source, commit and
user tags and its sample grid as a logged image.
"""

from __future__ import annotations

import re
import shutil
import struct
import urllib.request
from pathlib import Path

import pytest

from analysis.mlflow_ui import mlflow_server, rest, search_runs

from .conftest import TINY
from .test_analysis import EXP_W, tiny_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_study(tmp_path_factory)


def test_server_serves_one_study_run_per_dvc_run_with_its_cells(tiny, tmp_path):
    with mlflow_server(f"sqlite:///{tiny / 'mlflow.db'}", log=tmp_path / "server.log") as base:
        exp = rest(base, "experiments/get-by-name?experiment_name=cfg-lab")["experiment"]
        every = search_runs(base, exp["experiment_id"])
        cells = search_runs(
            base, exp["experiment_id"], "tags.run_kind = 'cell' and attributes.status = 'FINISHED'"
        )
        ordered = search_runs(
            base,
            exp["experiment_id"],
            "tags.run_kind = 'cell' and params.p_uncond = '0.1' and metrics.fid >= 0 and attributes.status = 'FINISHED'",
        )
        history = rest(base, f"metrics/get-history?run_id={cells[0]['info']['run_id']}&metric_key=fid")
        images = rest(base, f"artifacts/list?run_id={cells[0]['info']['run_id']}&path=images")
        with urllib.request.urlopen(base, timeout=30) as page:
            html = page.read().decode()

    p_grid, w_grid = TINY["train"]["p_uncond"], TINY["sample"]["w"]
    kind = {r["info"]["run_id"]: _tags(r)["run_kind"] for r in every}
    studies = {r["info"]["run_name"]: r for r in every if _tags(r)["run_kind"] == "study"}
    (repro,) = [n for n in studies if n.startswith("repro ")]
    assert sorted(studies) == sorted([repro, "wide-w"]), "one study run per DVC run"
    children = {name: [] for name in studies}
    ids = {r["info"]["run_id"]: name for name, r in studies.items()}
    for r in every:
        if "mlflow.parentRunId" in _tags(r):
            children[ids[_tags(r)["mlflow.parentRunId"]]].append(kind[r["info"]["run_id"]])
    n_w = len(w_grid)
    assert sorted(children[repro]) == sorted(["classifier", "train", "train", "report"] + ["cell"] * 2 * n_w)
    assert sorted(children["wide-w"]) == sorted(["report"] + ["cell"] * 2 * len(EXP_W)), "models reused"
    for study in studies.values():
        assert study["info"]["status"] == "FINISHED" and _params(study)["train.steps"] == str(
            TINY["train"]["steps"]
        )
        assert {m["key"] for m in study["data"]["metrics"]} >= {"best_fid", "max_is"}
    assert _tags(studies["wide-w"])["dvc_command"].startswith("dvc exp run --temp -n wide-w")

    train_of = {
        float(_params(r)["p_uncond"]): r["info"]["run_id"]
        for r in every
        if kind[r["info"]["run_id"]] == "train"
    }
    assert sorted(train_of) == sorted(p_grid)
    seen = set()
    for cell in cells:
        params, metrics = _params(cell), {m["key"]: m["value"] for m in cell["data"]["metrics"]}
        tags = _tags(cell)
        p, w = float(params["p_uncond"]), float(params["w"])  # numeric strings: the UI plots them as numbers
        seen.add((ids[tags["mlflow.parentRunId"]], p, w))
        assert cell["info"]["run_name"] == f"p_uncond={p:g} w={w:g}", "w visible in the name"
        assert isinstance(metrics["fid"], float) and isinstance(metrics["is"], float)
        assert metrics["fid"] >= 0 and metrics["is"] >= 1
        for key in ("kid_x1e3", "kid_x1e3_std", "fid_range_std", "precision", "recall", "class_acc"):
            assert isinstance(metrics[key], float), key
        assert {"sampler", "steps", "seed", "n_samples", "extractor"} <= set(params)
        assert tags["model_run_id"] == train_of[p], "linked to the train run of its p_uncond"
        assert tags["run_kind"] == "cell" and len(tags["fingerprint"]) == 12
        # the UI's Source, Version and User columns
        assert tags["mlflow.source.name"] == "pipelines/evaluate.py" and tags["mlflow.user"]
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        assert tags["git_commit"].startswith(tags["mlflow.source.git.commit"])
        assert tags["mlflow.loggedImages"] == "True"
    assert seen == {(repro, p, w) for p in p_grid for w in w_grid} | {
        ("wide-w", p, w) for p in p_grid for w in EXP_W
    }
    # the sample grid as MLflow's log_image stores it: the image and its thumbnail under images/
    logged = [f["path"] for f in images["files"]]
    assert len(logged) == 2 and all(f.startswith("images/samples+step+0+") for f in logged)
    assert sorted(f.rsplit("+", 1)[-1].split(".", 1)[-1] for f in logged) == ["png", "webp"], logged
    # searchable by parameter value and metric, as the UI's search box does
    assert {float(_params(c)["p_uncond"]) for c in ordered} == {0.1}
    assert len(ordered) == len(w_grid) + len(EXP_W)
    assert len(history["metrics"]) == 1
    assert "<html" in html.lower(), "the UI itself is served"


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium")
def test_screenshot_of_the_compare_view(tiny, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "screenshot_mlflow", Path(__file__).resolve().parents[1] / "scripts" / "screenshot_mlflow.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.screenshot(project=tiny, out=tmp_path / "compare.png")
    head = out.read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert head.startswith(b"\x89PNG") and (width, height) == (1400, 1700)
    assert 20_000 < out.stat().st_size < 600_000


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"]["params"]}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"]["tags"]}
