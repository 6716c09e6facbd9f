"""The MLflow UI's view of a real tiny study: a tracking server on localhost, read back over its REST API.

The compare view plots what the runs hold, so the check is on the runs as the server returns them: each cell run
has the parameters p_uncond and w and the metrics fid and is, all numbers, and is nested under the train run of
its p_uncond. The study is the session's tiny pipeline run (tests/test_analysis.py: tiny_study).
"""

from __future__ import annotations

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


def test_server_serves_cell_runs_for_the_compare_view(tiny, tmp_path):
    with mlflow_server(f"sqlite:///{tiny / 'mlflow.db'}", log=tmp_path / "server.log") as base:
        exp = rest(base, "experiments/get-by-name?experiment_name=cfg-lab")["experiment"]
        trains = search_runs(base, exp["experiment_id"], "tags.run_kind = 'train'")
        cells = search_runs(
            base, exp["experiment_id"], "tags.run_kind = 'cell' and attributes.status = 'FINISHED'"
        )
        ordered = search_runs(
            base,
            exp["experiment_id"],
            "tags.run_kind = 'cell' and params.p_uncond = '0.1' and metrics.fid >= 0 and attributes.status = 'FINISHED'",
        )
        history = rest(base, f"metrics/get-history?run_id={cells[0]['info']['run_id']}&metric_key=fid")
        with urllib.request.urlopen(base, timeout=30) as page:
            html = page.read().decode()

    p_grid, w_grid = TINY["train"]["p_uncond"], TINY["sample"]["w"]
    assert len(cells) == len(p_grid) * (len(w_grid) + len(EXP_W))
    train_of = {float(_params(t)["p_uncond"]): t["info"]["run_id"] for t in trains}
    assert sorted(train_of) == sorted(p_grid)
    seen = set()
    for cell in cells:
        params, metrics = _params(cell), {m["key"]: m["value"] for m in cell["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in cell["data"]["tags"]}
        p, w = float(params["p_uncond"]), float(params["w"])  # numeric strings: the UI plots them as numbers
        seen.add((p, w))
        assert isinstance(metrics["fid"], float) and isinstance(metrics["is"], float)
        assert metrics["fid"] >= 0 and metrics["is"] >= 1
        for key in ("kid_x1e3", "kid_x1e3_std", "fid_range_std", "precision", "recall", "class_acc"):
            assert isinstance(metrics[key], float), key
        assert {"sampler", "steps", "seed", "n_samples", "extractor"} <= set(params)
        assert tags["mlflow.parentRunId"] == train_of[p], "nested under the train run of its p_uncond"
        assert tags["run_kind"] == "cell" and len(tags["fingerprint"]) == 12
        assert cell["info"]["run_name"].startswith(f"cell p_uncond={params['p_uncond']} w=")
    assert seen == {(p, w) for p in p_grid for w in sorted(set(w_grid) | set(EXP_W))}
    # searchable by parameter value and metric, as the UI's search box does
    assert {float(_params(c)["p_uncond"]) for c in ordered} == {0.1} and len(ordered) == len(w_grid) + len(
        EXP_W
    )
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
    assert head.startswith(b"\x89PNG") and (width, height) == (1400, 1500)
    assert 20_000 < out.stat().st_size < 600_000


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"]["params"]}
