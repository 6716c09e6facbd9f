"""The MLflow UI of the study: a lean `mlflow server` and the two views it opens on.

`serve` (``python -m cfg.study.tracking ui``, ``make ui``) prints two links into the latest study (the study of the
newest cell run, or one named by ``--study``) and starts the server:

- runs: that study's cell runs, grouped by p_uncond in the order they were logged, with the columns p_uncond, w,
  fid, is, class_acc, precision, recall;
- charts: parallel coordinates p_uncond, w -> fid, is; FID and IS against w; IS against FID; and the cells'
  sample grids side by side (the image `samples` of each cell run).

Both are one MLflow shared view (what the UI's Share button makes: an experiment tag
``mlflow.sharedViewState.<key>`` holding the view as JSON, which the page loads from ``?viewStateShareKey=<key>``),
in the UI's model-training mode (``?workflowType=machine_learning``; the GenAI overview is its default).

The server is lean: one uvicorn worker and no job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no huey
consumers, which serve GenAI evaluation jobs only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from cfg.study.store import connect, create_private_store, experiment_id, masked, project_root, tracking_uri

# the server without the job runner and its huey consumers, with one worker
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: the experiment tag a shared view lives in
PARAMS = ["p_uncond", "w", "guidance"]  # the cells' settings in the runs table
METRICS = ["fid", "is", "class_acc", "precision", "recall"]
SECTIONS = {"plots": "cfg-lab-tradeoff", "samples": "cfg-lab-samples"}  # the charts' section ids


def server_command(uri: str, host: str = "127.0.0.1", port: int = 5000) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the lean `mlflow server` against the store `uri` (given in the environment,
    where `ps` does not show a password)."""
    argv = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    return argv, {**os.environ, **LEAN_ENV, "MLFLOW_BACKEND_STORE_URI": uri}


def cell_filter(client, exp_id: str, study: str | None = None) -> str | None:
    """The search filter of one study's cell runs: `study` (a study run's name, e.g. the DVC experiment's, or
    its key), else the study of the newest cell run; None when the experiment has no cell run. Cells logged
    before runs had studies are told apart by their params hash."""
    if study:
        found = client.search_runs(
            [exp_id],
            f"tags.run_kind = 'study' and attributes.run_name = '{study}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        key = found[0].data.tags["study"] if found else study
        return f"tags.study = '{key}' and tags.run_kind = 'cell'"
    newest = client.search_runs(
        [exp_id], "tags.run_kind = 'cell'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not newest:
        return None
    tags = newest[0].data.tags
    if "study" in tags:
        return f"tags.study = '{tags['study']}' and tags.run_kind = 'cell'"
    return f"tags.params_hash = '{tags.get('params_hash', '')}' and tags.run_kind = 'cell'"


def _chart(uuid: str, kind: str, section: str, **fields: Any) -> dict[str, Any]:
    """One chart card of the charts view (the UI's RunsChartsCardConfig, as it stores it)."""
    base = {"uuid": uuid, "type": kind, "runsCountToCompare": 100, "metricSectionId": SECTIONS[section]}
    return base | {"deleted": False, "isGenerated": False} | fields


def _axis(key: str) -> dict[str, str]:
    return {"key": key, "type": "PARAM" if key in PARAMS else "METRIC"}


def view_state(search_filter: str) -> dict[str, Any]:
    """The shared view of the cells `search_filter` selects: the runs table's filter, order, grouping and
    columns, and the charts."""
    scatter = [("w", "fid"), ("w", "is"), ("fid", "is")]
    return {
        "searchFilter": search_filter,
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        # grouped runs show flat (ungrouped, they would hide under the study run); charts show every cell
        "groupBy": {
            "aggregateFunction": "min",
            "groupByKeys": [{"mode": "param", "groupByData": "p_uncond"}],
        },
        "useGroupedValuesInCharts": False,
        "runsHiddenMode": "SHOW_ALL",
        "selectedColumns": [f"params.`{p}`" for p in PARAMS] + [f"metrics.`{m}`" for m in METRICS],
        "compareRunSections": [
            {"uuid": SECTIONS["plots"], "name": "Guidance trade-off", "display": True, "isReordered": False}
            | {"columns": 2, "cardHeight": 400},
            {"uuid": SECTIONS["samples"], "name": "Sample grids", "display": True, "isReordered": False}
            | {"columns": 1, "cardHeight": 720},
        ],
        "compareRunCharts": [
            _chart(
                "cfg-lab-parallel",
                "PARALLEL",
                "plots",
                selectedParams=["p_uncond", "w"],
                selectedMetrics=["fid", "is"],
                showAllRuns=True,
            ),
            *[
                _chart(f"cfg-lab-{x}-{y}", "SCATTER", "plots", xaxis=_axis(x), yaxis=_axis(y))
                for x, y in scatter
            ],
            _chart("cfg-lab-samples", "IMAGE", "samples", imageKeys=["samples"], step=0, showRunParams=False),
        ],
    }


def publish(client, exp_id: str, state: dict[str, Any]) -> str:
    """Store `state` as a shared view of the experiment; returns its key (the same state, the same key)."""
    text = json.dumps(state, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()
    client.set_experiment_tag(exp_id, SHARED_VIEW_TAG + key, text)
    return key


def view_urls(client, experiment: str, base: str, study: str | None = None) -> dict[str, str]:
    """{"runs": ..., "charts": ...}: links into the study's shared view on the UI at `base`; only "runs" (the
    experiment's runs table) when it has no cell run yet; {} without the experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    search = cell_filter(client, exp.experiment_id, study)
    if search is None:
        return {"runs": runs}
    runs += f"&viewStateShareKey={publish(client, exp.experiment_id, view_state(search))}"
    return {"runs": runs, "charts": runs + "&compareRunsMode=CHART"}


def default_experiment(root: Path) -> str:
    """tracking.experiment of the project's params.yaml (cfg-lab without one)."""
    from cfg.io import load_yaml

    path = root / "params.yaml"
    raw = load_yaml(path.read_text()) if path.is_file() else {}
    return ((raw or {}).get("tracking") or {}).get("experiment", "cfg-lab")


def serve(
    port: int = 5000,  # TCP port of the UI
    host: str = "127.0.0.1",  # interface it listens on
    experiment: str | None = None,  # MLflow experiment; None: tracking.experiment of params.yaml
    study: str | None = None,  # study run name (DVC experiment) or key to open on; None: the latest
) -> None:
    """`python -m cfg.study.tracking ui`: print the links into the study and exec the lean `mlflow server` on
    the project's store (returns only for a store that is a tracking server: then its links are printed)."""
    root = project_root()
    uri = tracking_uri(root)
    experiment = experiment or default_experiment(root)
    if uri.startswith(("http://", "https://", "databricks")):
        print(f"the store is a tracking server: its UI is at {masked(uri)}", flush=True)
        base = re.sub(r"//[^/]*@", "//", masked(uri).rstrip("/"))  # the link, without userinfo
        _print_links(uri, experiment, base, study, root)
        return
    create_private_store(uri)
    print(f"MLflow UI on http://{host}:{port} (store {masked(uri)}; one worker, no job runner)", flush=True)
    _print_links(uri, experiment, f"http://{host}:{port}", study, root)
    argv, env = server_command(uri, host, port)
    os.execve(argv[0], argv, env)


def _print_links(uri: str, experiment: str, base: str, study: str | None, root: Path) -> None:
    try:
        client, _ = connect(uri, lambda c: experiment_id(c, experiment, uri, root))
    except SystemExit as e:  # the UI still starts: it shows what the store holds once it answers
        print(f"no links into the study: {e}", flush=True)
        return
    links = view_urls(client, experiment, base, study)
    what = {"runs": "runs of the latest study" if not study else f"runs of study {study}", "charts": "charts"}
    for name, url in links.items():
        print(f"  {what[name]}: {url}", flush=True)
