"""One MLflow run per study: the stages of one DVC run nest their runs under it, found or created once.

The study is the DVC process that runs a stage (`current_study`), checked on a real process chain; the Tracker
side runs in this process against a real SQLite store, with DVC_STAGE set as DVC sets it, so the study is this
test's parent process. Concurrent stages make one study run; offline, the study run waits in the queue and its
replay nests every stage's runs under one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfg.study.queue import sync
from cfg.study.store import QUEUE_DIR, current_study, process_id
from cfg.study.tracking import Tracker
from cfg.study.ui import SHARED_VIEW_TAG, view_urls

from .conftest import ROOT

# prints the study a stage started by this chain sees: a "dvc" process (no DVC_STAGE) -> sh (DVC_STAGE) -> stage
CHILD = "import json; from cfg.study.store import current_study; s = current_study(); print(json.dumps([s.key, s.name, s.process]))"
DVC = (
    "import os, subprocess, sys, json; from cfg.study.store import process_id; "
    "env = {**os.environ, 'DVC_STAGE': 'train@0.1', **json.loads(sys.argv[1])}; "
    "out = subprocess.run(['sh', '-c', f'{sys.executable} -c \"{sys.argv[2]}\"'], env=env, capture_output=True, "
    "text=True, check=True).stdout; print(json.dumps([process_id(), out.strip()]))"
)


def _chain(env: dict[str, str]) -> tuple[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    out = subprocess.run(
        [sys.executable, "-c", DVC, json.dumps(env), CHILD.replace('"', "'")],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_the_study_is_the_process_that_started_the_stage():
    dvc, seen = _chain({})
    key, name, process = json.loads(seen)
    assert process == dvc, "the nearest ancestor without DVC_STAGE, past the shell"
    assert name.startswith("repro ") and len(key) == 16
    dvc2, seen2 = _chain({"DVC_EXP_NAME": "wide-w"})
    key2, name2, _ = json.loads(seen2)
    assert name2 == "wide-w" and key2 != key, "another DVC run, another study"
    assert os.environ.get("DVC_STAGE") is None and current_study() is None, "outside DVC: no study"


def _runs(db: Path) -> list:
    client = MlflowClient(f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "cfg-lab"]
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables, made once: creating them takes seconds, copying the file not."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def _stage_project(tmp_path: Path, monkeypatch, empty_store: Path) -> None:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CFG_LAB_TRACKING", raising=False)
    monkeypatch.setenv("DVC_STAGE", "train@0.1")  # as DVC sets it for a stage: the study is our parent
    monkeypatch.chdir(tmp_path)  # a stage's working directory: params.yaml is the study's
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")


@pytest.mark.slow  # an MLflow SQLite store's tables take ~8 s to create on 2 cores
def test_concurrent_stages_of_a_study_nest_under_one_study_run(tmp_path, monkeypatch, empty_store):
    _stage_project(tmp_path, monkeypatch, empty_store)
    trackers = [Tracker.open(f"train@{p}", "cfg-lab", root=tmp_path) for p in (0.1, 0.5)]
    made, start = {}, threading.Barrier(2)

    def stage(t: Tracker, p: float) -> None:
        start.wait()  # both look the study up at once
        made[p] = t.start_run(f"train p_uncond={p}", "h", {"run_kind": "train"})
        t.finish()

    threads = [threading.Thread(target=stage, args=(t, p)) for t, p in zip(trackers, (0.1, 0.5), strict=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    runs = _runs(tmp_path / "mlflow.db")
    (study,) = [r for r in runs if r.data.tags["run_kind"] == "study"]
    expected = current_study()
    assert expected is not None and expected.process == process_id(os.getppid())
    expected = expected.key
    assert study.data.tags["study"] == expected and study.info.status == "FINISHED"
    assert study.data.tags["process"] == process_id(os.getppid()), "the DVC process, not a stage's"
    assert study.data.params["train.steps"] and study.data.params["sample.n_samples"], "the study's params"
    assert not any(k.startswith(("search.", "tracking.")) for k in study.data.params)
    trains = {r.info.run_id: r for r in runs if r.data.tags["run_kind"] == "train"}
    assert set(trains) == set(made.values())
    for r in trains.values():
        assert r.data.tags["mlflow.parentRunId"] == study.info.run_id and r.data.tags["study"] == expected
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.name"], "the UI's User and Source"


@pytest.mark.slow
def test_a_failed_stage_is_not_hidden_by_a_stage_of_the_study_that_finishes_after_it(
    tmp_path, monkeypatch, empty_store
):
    # cfg-lab repro --parallel: the arms are concurrent stages of one study; one fails, another finishes later
    _stage_project(tmp_path, monkeypatch, empty_store)
    failed = Tracker.open("train@0.1", "cfg-lab", root=tmp_path)
    failed.start_run("train p_uncond=0.1", "h", {"run_kind": "train"})
    failed._at_exit()  # what the stage's exit handler does when it dies before finish()
    later = Tracker.open("train@0.5", "cfg-lab", root=tmp_path)
    later.start_run("train p_uncond=0.5", "h", {"run_kind": "train"})
    later.finish()
    runs = _runs(tmp_path / "mlflow.db")
    (study,) = [r for r in runs if r.data.tags["run_kind"] == "study"]
    assert study.info.status == "FAILED"
    trains = {r.info.run_name: r.info.status for r in runs if r.data.tags["run_kind"] == "train"}
    assert trains == {"train p_uncond=0.1": "FAILED", "train p_uncond=0.5": "FINISHED"}
    # offline: the failure is recorded beside the queued study run, so the replay ends it FAILED as well
    offline = tmp_path / "offline"
    offline.mkdir()
    _stage_project(offline, monkeypatch, empty_store)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    failed = Tracker.open("train@0.1", "cfg-lab", root=offline)
    failed.start_run("train p_uncond=0.1", "h", {"run_kind": "train"})
    failed._at_exit()
    later = Tracker.open("train@0.5", "cfg-lab", root=offline)
    later.start_run("train p_uncond=0.5", "h", {"run_kind": "train"})
    later.finish()
    monkeypatch.delenv("CFG_LAB_TRACKING")
    sync(offline)
    (study,) = [r for r in _runs(offline / "mlflow.db") if r.data.tags["run_kind"] == "study"]
    assert study.info.status == "FAILED"
    # and a study whose stages all succeed ends FINISHED
    other = tmp_path / "other"
    other.mkdir()
    _stage_project(other, monkeypatch, empty_store)
    for p in (0.1, 0.5):
        t = Tracker.open(f"train@{p}", "cfg-lab", root=other)
        t.start_run(f"train p_uncond={p}", "h", {"run_kind": "train"})
        t.finish()
    (study,) = [r for r in _runs(other / "mlflow.db") if r.data.tags["run_kind"] == "study"]
    assert study.info.status == "FINISHED"


@pytest.mark.slow
def test_offline_stages_queue_one_study_run_that_the_replay_creates_once(tmp_path, monkeypatch, empty_store):
    _stage_project(tmp_path, monkeypatch, empty_store)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    train = Tracker.open("train@0.1", "cfg-lab", root=tmp_path)
    train_run = train.start_run("train p_uncond=0.1", "h", {"run_kind": "train"})
    train.finish()
    cells = Tracker.open("evaluate", "cfg-lab", root=tmp_path)
    model = cells.parent_of(train_run)
    cell = cells.start_run("p_uncond=0.1 w=0.3", "h", {"run_kind": "cell", "model_run_id": model})
    cells.log(cell, params={"p_uncond": 0.1, "w": 0.3}, metrics={"fid": 12.5, "is": 3.25})
    cells.finish()
    queued = json.loads((tmp_path / QUEUE_DIR / "studies.json").read_text())
    ((study_ref, entry),) = queued.items()
    assert entry["run"].startswith("queued-") and cells.study_run() == train.study_run() == entry["run"]

    monkeypatch.delenv("CFG_LAB_TRACKING")
    assert sync(tmp_path) == (2, 0)
    runs = _runs(tmp_path / "mlflow.db")
    (study,) = [r for r in runs if r.data.tags["run_kind"] == "study"]
    assert study.data.tags["study"] == study_ref and study.info.status == "FINISHED"
    by_kind = {r.data.tags["run_kind"]: r for r in runs}
    assert len(runs) == 3
    for kind in ("train", "cell"):
        assert by_kind[kind].data.tags["mlflow.parentRunId"] == study.info.run_id
    assert by_kind["cell"].data.tags["model_run_id"] == by_kind["train"].info.run_id

    # the UI's view of the study: its cells, with fid and is as columns and charts
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    urls = view_urls(client, "cfg-lab", "http://ui")
    key = urls["runs"].split("viewStateShareKey=")[1]
    assert (
        urls["charts"] == urls["runs"] + "&compareRunsMode=CHART"
        and "workflowType=machine_learning" in urls["runs"]
    )
    state = json.loads(client.get_experiment_by_name("cfg-lab").tags[SHARED_VIEW_TAG + key])
    assert state["searchFilter"] == f"tags.study = '{study_ref}' and tags.run_kind = 'cell'"
    assert {"metrics.`fid`", "metrics.`is`", "params.`w`", "params.`p_uncond`"} <= set(
        state["selectedColumns"]
    )
    found = client.search_runs([study.info.experiment_id], state["searchFilter"])
    assert [r.info.run_id for r in found] == [by_kind["cell"].info.run_id]


def test_a_study_pid_that_is_no_ancestor_is_ignored():
    # CFG_LAB_STUDY_PID (cfg-lab repro --parallel) names the launcher above the stage; a stale or exported
    # value that names no ancestor must not attach runs to another process's study
    from cfg.study.store import _is_ancestor

    assert _is_ancestor(os.getppid())
    assert not _is_ancestor(os.getpid()) and not _is_ancestor(999_999_999)
