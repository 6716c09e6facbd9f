"""A search worker against what the command line, the user and the machine give it: -S overrides that must reach
best_params.yaml, a Ctrl-C mid-trial, a PostgreSQL restart, a classifier that is not the reference's, a bad
search section given to `cfg-lab search`, and GPUS under a CUDA_VISIBLE_DEVICES already set."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from cfg import cli
from cfg.nets.classifier import load_classifier, save_classifier
from cfg.search.results import best_params_yaml, summary
from cfg.search.space import SearchError, check_search, read_search
from cfg.search.storage import Budget, experimental_ok, retry_of, storage_url, study_lock
from cfg.search.worker import run_worker, worker_slots
from cfg.study.config import params_from_dict
from cfg.study.presets import exp_run_command, merged_params
from cfg.study.stage import make_extractor

from . import postgres
from .conftest import ROOT, run
from .test_search import (  # noqa: F401  (fixtures)
    input_files,
    inputs,
    mlflow_store,
    pg_server,
    start_worker,
    tiny_raw,
    worker_cmd,
    write_params,
)


def wait_for_running_trial(storage: str, worker: subprocess.Popen, log: Path) -> FrozenTrial:
    """The trial `worker` trains (RUNNING, its MLflow run started)."""
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and worker.poll() is None, log.read_text()
        try:
            running = optuna.load_study(study_name="cfg-search", storage=storage).get_trials(
                states=(TrialState.RUNNING,)
            )
        except KeyError:  # study not created yet
            running = []
        if running and running[0].user_attrs.get("worker", "").endswith(f":{worker.pid}"):
            if "mlflow_run_id" in running[0].user_attrs:
                return running[0]
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------
# -S overrides are part of what reproduces a trial


def test_command_line_overrides_reach_best_params_and_apply(tmp_path, inputs):  # noqa: F811
    """The trial trained with params.yaml plus -S (read as pipelines/search.py reads them): best_params.yaml,
    summary.json and `apply`'s `dvc exp run` carry the -S values under the trial's own, but not search.* ones
    (no stage reads them)."""
    space = {
        "train.p_uncond": {"low": 0.1, "high": 0.3, "step": 0.1},
        "train.lr": {"low": 1e-3, "high": 1e-2},
    }
    raw = tiny_raw(tmp_path, n_trials=1, space=space)
    params = write_params(tmp_path, raw)
    sets = ["train.steps=20", "sample.steps=4", "train.lr=0.5", "search.seed=3"]
    study = run_worker(read_search(params, sets), inputs, log=lambda _: None)

    (trial,) = study.trials
    text = best_params_yaml(study, trial)
    best = yaml.safe_load(text)
    assert best == {
        "train.steps": 20,
        "sample.steps": 4,
        "train.lr": pytest.approx(trial.params["train.lr"], rel=1e-11),  # the trial's value over the -S one
        "train.p_uncond": [trial.params["train.p_uncond"]],
        "sample.w": [0.0, 1.0],
    }
    assert "-S overrides of params.yaml: train.steps, sample.steps." in text
    assert summary(study)["best"][0]["overrides"] == best
    assert study.user_attrs["overrides"] == {"train.steps": 20, "sample.steps": 4, "train.lr": 0.5}
    # applied to the params.yaml the search read, they give the parameters the trial ran with
    p = params_from_dict(merged_params(raw, best))
    assert (p.train.steps, p.sample.steps, p.train.lr) == (20, 4, best["train.lr"])
    cmd = exp_run_command(best, params_file=params)  # what `pipelines/search.py apply` prints and runs
    assert {"train.steps=20", "sample.steps=4"} <= set(cmd), cmd


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.slow
def test_a_trial_stopped_by_ctrl_c_runs_again_and_is_not_counted(tmp_path, input_files, inputs):  # noqa: F811
    """SIGINT to a worker mid-trial: the trial fails (its MLflow run KILLED) and is queued again as the
    heartbeat retry queues a lost worker's, outside the budget; the next worker runs it and nothing more."""
    raw = tiny_raw(tmp_path, n_trials=1, pruner="none", pruner_options={}, max_retry=0, eval_every=40)
    raw["search"]["space"]["train.steps"] = {"choices": [80]}  # some seconds
    params = write_params(tmp_path, raw)
    storage = raw["search"]["storage"]
    log = tmp_path / "w.log"
    worker = start_worker(worker_cmd(params, input_files, tmp_path / "out"), tmp_path, log)
    stopped = wait_for_running_trial(storage, worker, log)
    time.sleep(1)  # into its training
    worker.send_signal(signal.SIGINT)
    code = worker.wait(timeout=60)

    study = optuna.load_study(study_name="cfg-search", storage=storage)
    assert study.trials[stopped.number].state == TrialState.FAIL
    retries = [t for t in study.get_trials() if retry_of(t) is not None]
    assert len(retries) == 1, "the stopped trial was not queued again"
    (retry,) = retries
    assert retry.state == TrialState.WAITING and retry_of(retry) == stopped.number
    assert retry.params == stopped.params
    assert Budget.of(study) == Budget(used=1, waiting=1, running=0), "the retry is outside n_trials"
    assert code == 128 + signal.SIGINT, log.read_text()
    assert f"trial {stopped.number} interrupted: queued to run again" in log.read_text()
    con = sqlite3.connect(tmp_path / "mlflow.db")
    (run_id, status), *_ = con.execute(
        "select run_uuid, status from runs where name = ?", (f"trial {stopped.number}",)
    )
    tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)))
    assert status == "KILLED" and tags["optuna.state"] == "FAIL" and "interrupted" in tags["failure"]

    # the next worker runs the stopped trial again (max_retry 0 is for crashes), and no other
    study = run_worker(check_search(raw), inputs, log=lambda _: None)
    trials = study.get_trials()
    assert [(t.number, t.state) for t in trials] == [
        (stopped.number, TrialState.FAIL),
        (retry.number, TrialState.COMPLETE),
    ]
    assert study.trials[retry.number].params == stopped.params


# ---------------------------------------------------------------------------------------------------------
# A PostgreSQL restart


def restart_postgres(server_url: str, down_s: float = 0.0) -> None:
    """Restart the test server (tests/postgres.py) the way an operator does, `pg_ctl restart -m fast`, or stop it
    for `down_s` seconds first: the server closes every session."""
    import psycopg2

    con = psycopg2.connect(f"{server_url}/postgres")
    with con.cursor() as cur:
        cur.execute("SHOW data_directory")
        data = Path(cur.fetchone()[0])
    con.close()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    pg_ctl = [
        *as_user,
        str(postgres.server_bin() / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(data.parent / "log"),
    ]
    if not down_s:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "restart"], check=True, capture_output=True)
        return
    # the server's own options (port, socket folder, ...), as `pg_ctl restart` reuses them
    options = shlex.join(shlex.split((data / "postmaster.opts").read_text())[1:])
    subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
    time.sleep(down_s)
    subprocess.run([*pg_ctl, "-o", options, "-w", "start"], check=True, capture_output=True)


def advisory_locks(server_url: str) -> int:
    """Advisory locks granted on the server."""
    import psycopg2

    con = psycopg2.connect(f"{server_url}/postgres")
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            return cur.fetchone()[0]
    finally:
        con.close()


def test_the_study_lock_outlives_a_postgres_restart(pg_server):  # noqa: F811
    url = storage_url(postgres.create_database(pg_server, "optuna_lock_restart"))
    lock = study_lock(url, "cfg-search")
    try:
        lock.acquire()
        lock.release()
        restart_postgres(pg_server)  # between two trials: the lock's session is gone
        lock.acquire()  # was: OperationalError: server closed the connection unexpectedly
        assert lock.held and advisory_locks(pg_server) == 1
        lock.release()
        assert advisory_locks(pg_server) == 0
        lock.acquire()
        restart_postgres(pg_server)  # while held: the lock went with its session
        lock.release()
        assert not lock.held and advisory_locks(pg_server) == 0
        lock.acquire()
        assert advisory_locks(pg_server) == 1
    finally:
        lock.close()
    assert advisory_locks(pg_server) == 0


@pytest.mark.slow
def test_a_worker_and_its_trial_outlive_a_postgres_restart(tmp_path, input_files, pg_server):  # noqa: F811
    """The server goes for longer than a heartbeat interval while trial 0 trains: the trial's heartbeats resume
    (another worker's stale check leaves it running), and the worker takes the study's lock again after it."""
    storage = storage_url(postgres.create_database(pg_server, "optuna_worker_restart"))
    # no intermediate FIDs: the trial itself does not touch the storage while it trains
    raw = tiny_raw(tmp_path, n_trials=1, pruner="none", pruner_options={}, storage=storage, eval_every=200)
    raw["search"]["space"]["train.steps"] = {"choices": [200]}
    params = write_params(tmp_path, raw)
    log = tmp_path / "w.log"
    worker = start_worker(worker_cmd(params, input_files, tmp_path / "out"), tmp_path, log)
    trial = wait_for_running_trial(storage, worker, log)
    restart_postgres(pg_server, down_s=2 * raw["search"]["heartbeat_interval"])
    time.sleep(raw["search"]["grace_period"] + 1)
    with experimental_ok():  # what every other worker runs before each trial and while it waits
        beating = optuna.storages.RDBStorage(
            storage, heartbeat_interval=1, grace_period=raw["search"]["grace_period"]
        )
        study = optuna.load_study(study_name="cfg-search", storage=beating)
        assert study.trials[trial.number].state == TrialState.RUNNING, "the trial ended before the check"
        optuna.storages.fail_stale_trials(study)
    assert study.trials[trial.number].state == TrialState.RUNNING, "its heartbeats stopped with the server"
    assert worker.wait(timeout=300) == 0, log.read_text()
    study = optuna.load_study(study_name="cfg-search", storage=storage)
    assert [(t.number, t.state) for t in study.get_trials()] == [(trial.number, TrialState.COMPLETE)]


# ---------------------------------------------------------------------------------------------------------
# Inputs that do not belong together


def test_a_classifier_that_is_not_the_references_is_refused_before_the_study(tmp_path, input_files):  # noqa: F811
    model, meta = load_classifier(input_files["classifier"])
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # another training's weights
    other = tmp_path / "other_classifier.pt"
    save_classifier(other, model, meta)
    params = write_params(tmp_path, tiny_raw(tmp_path))
    files = {**input_files, "classifier": other}
    out = run(worker_cmd(params, files, tmp_path / "out"), tmp_path, check=False)
    assert out.returncode != 0
    mine = make_extractor("classifier", other, None, torch.device("cpu")).weights_hash
    theirs = make_extractor("classifier", input_files["classifier"], None, torch.device("cpu")).weights_hash
    assert mine != theirs
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    for text in (str(other), mine, str(input_files["reference"]), theirs):
        assert text in line, (text, out.stderr)
    assert not (tmp_path / "optuna.db").exists(), "no study was created, no trial used up"


# ---------------------------------------------------------------------------------------------------------
# `cfg-lab search` checks the search section before it builds the inputs


@pytest.mark.parametrize(
    ("space", "args", "message"),
    [
        (
            {"train.lr": {"low": 0.01, "high": 0.001}},
            [],
            "search.space.train.lr: low = 0.01 must be below high = 0.001",
        ),
        (
            None,
            ["-S", "search.n_samples_cheap=100"],
            "n_samples_cheap = 100 must not exceed sample.n_samples = 40",
        ),
        (None, ["--n-trials", "0"], "search.n_trials = 0 is out of range"),
        (None, ["-S", "search.objective=fidd"], "fidd"),
    ],
)
def test_cfg_lab_search_checks_the_search_before_dvc_repro(
    tmp_path, monkeypatch, capsys, space, args, message
):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    raw = tiny_raw(tmp_path, **({"space": space} if space else {}))
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as stop:
        cli.main(["search", *args])
    assert str(stop.value).startswith("error: params.yaml: ") and message in str(stop.value)
    assert "dvc repro" not in capsys.readouterr().err, "the stages ran before the check"


# ---------------------------------------------------------------------------------------------------------
# GPUS under CUDA_VISIBLE_DEVICES


def test_gpus_index_the_cuda_visible_devices_already_set():
    two_of_four = [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"}]
    assert worker_slots("0,1", 1, "cuda", 2, "2,3") == two_of_four
    assert worker_slots("0,1", 1, "cuda", -1, "2, 3") == two_of_four
    assert worker_slots("1", 2, "cuda", 2, "2,3") == [{"CUDA_VISIBLE_DEVICES": "3"}] * 2
    uuid = "GPU-5a1d9e3f-0000-0000-0000-000000000000"
    assert worker_slots(f"1,{uuid}", 1, "cuda", 2, "2,3") == [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": uuid},
    ]
    assert worker_slots("0,1", 1, "cuda", 4) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    for args, message in [
        (("0,2", 1, "cuda", 2, "2,3"), r"GPUS = '0,2': index 2 is outside CUDA_VISIBLE_DEVICES = '2,3'"),
        (("0,2", 1, "cuda", -1, "2,3"), r"takes indices into that list \(0, 1\) or GPU UUIDs"),
        (("1", 1, "cuda", 1, "2,-1"), r"index 1 is outside .* into that list \(0\)"),  # CUDA stops at -1
        ((f"0,{uuid}", 1, "cuda", 2, f"{uuid},3"), r"gives a GPU of CUDA_VISIBLE_DEVICES = .* twice"),
    ]:
        with pytest.raises(SearchError, match=message):
            worker_slots(*args)
