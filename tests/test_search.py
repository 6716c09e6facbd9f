"""The Optuna search on the real params.yaml shrunk: space checks, real studies on SQLite and PostgreSQL,
pruning, the exact trial budget of concurrent workers, a worker killed mid-trial, and the best trial
reproduced through `dvc exp run`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from cfg.data.datasets import load_dataset, load_prepared, save_prepared
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.stats import load_reference_stats, reference_stats, save_reference_stats
from cfg.nets.classifier import ClassifierConfig, save_classifier, train_classifier
from cfg.nets.unet import load_checkpoint
from cfg.search.objective import SearchInputs
from cfg.search.results import best_params_yaml, best_trials, summary
from cfg.search.space import SearchError, check_search, trial_params
from cfg.search.storage import retry_of, storage_url
from cfg.search.worker import run_worker
from cfg.study.presets import exp_run_command
from cfg.study.records import p_uncond_name, read_cells
from cfg.study.stage import make_extractor

from . import postgres
from .conftest import ROOT, TINY, VENV_BIN, run

SCRIPT = str(ROOT / "pipelines" / "search.py")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """The MLflow runs of each test in tmp_path/mlflow.db: the store is no parameter but MLFLOW_TRACKING_URI,
    which the workers started by start_worker inherit."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def tiny_raw(tmp: Path, **search) -> dict:
    """The real params.yaml shrunk to seconds per trial, storing the study under `tmp`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    raw["train"].update(batch_size=32, steps=30)
    raw["sample"].update(w=[0.0], n_samples=40)
    raw["search"].update(
        storage=f"sqlite:///{tmp / 'optuna.db'}",
        n_trials=4,
        sampler="random",
        sampler_options={},
        pruner_options={"n_startup_trials": 1},
        w=[0.0, 1.0],
        eval_every=10,
        n_samples_cheap=20,
        heartbeat_interval=1,
        grace_period=3,
        space={
            "train.p_uncond": {"low": 0.1, "high": 0.3, "step": 0.1},
            "train.lr": {"low": 1e-5, "high": 1e-2, "log": True},
            "train.steps": {"low": 20, "high": 40, "step": 10},
        },
    )
    raw["search"].update(search)
    return raw


def write_params(tmp: Path, raw: dict) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def input_files(tmp_path_factory) -> dict[str, Path]:
    """What the prepare / classifier / reference stages write, made with the same library calls, tiny."""
    d = tmp_path_factory.mktemp("inputs")
    ds = load_dataset("digits", image_size=8, max_train=300, max_test=200)
    save_prepared(ds, d / "prepared.pt")
    config = ClassifierConfig(in_channels=1, num_classes=10, image_size=8, width=8, feature_dim=32)
    model, _ = train_classifier(ds.train_x, ds.train_y, config, epochs=15, lr=0.005)
    save_classifier(d / "classifier.pt", model, {})
    ext = classifier_extractor(model)
    feats = extract_features(ext, ds.test_x)
    save_reference_stats(d / "reference.pt", reference_stats(feats, ext, labels=ds.test_y))
    return {"data": d / "prepared.pt", "classifier": d / "classifier.pt", "reference": d / "reference.pt"}


@pytest.fixture(scope="module")
def inputs(input_files) -> SearchInputs:
    """As pipelines/search.py loads them."""
    device = torch.device("cpu")
    return SearchInputs(
        data=load_prepared(input_files["data"]),
        extractor=make_extractor("classifier", input_files["classifier"], None, device),
        reference=load_reference_stats(input_files["reference"]),
        device=device,
    )


def worker_cmd(params: Path, files: dict[str, Path], out_dir: Path, *extra: str) -> list[str]:
    return (
        [sys.executable, SCRIPT, "--params", str(params), "run", "--out-dir", str(out_dir)]
        + [arg for key, path in files.items() for arg in (f"--{key}", str(path))]
        + list(extra)
    )


def start_worker(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)


def originals(study: optuna.Study) -> list:
    """Trials counted against n_trials: all but the retries of trials whose worker died."""
    return [t for t in study.get_trials() if retry_of(t) is None]


# ---------------------------------------------------------------------------------------------------------
# The search section is checked before anything is trained


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {}}, r"search\.space is empty"),
        ({"space": {"data.max_train": {"low": 10, "high": 20}}}, r"only model\.\*, train\.\* and sample\.\*"),
        (
            {"space": {"train.learning_rate": {"low": 0.1, "high": 1}}},
            r"'train\.learning_rate' is not a params",
        ),
        ({"space": {"train.lr": {"low": 0.01, "high": 0.001}}}, r"low = 0\.01 must be below high = 0\.001"),
        ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, r"log range needs low > 0"),
        (
            {"space": {"train.steps": {"low": 10.5, "high": 20}}},
            r"train\.steps\.low = 10\.5 must be an integer",
        ),
        ({"space": {"train.lr": {"low": 0.1, "hi": 1}}}, r"unknown field 'hi'"),
        ({"space": {"train.p_uncond": {"low": 0.1, "high": 1.5}}}, r"p_uncond\[0\] = 1\.5 is out of range"),
        ({"space": {"model.base_width": {"choices": [4, 8]}}}, r"base_width = 4 is out of range"),
        ({"space": {"model.channel_mult": {"choices": [1, 2]}}}, r"channel_mult is a list"),
        ({"space": {"sample.n_samples": {"low": 10, "high": 20}}}, r"sample counts do not compare"),
        (
            {"space": {"sample.compile": {"low": 0, "high": 1}}},
            r"sample\.compile is a str; search it with \{choices",
        ),
        (
            {"space": {"sample.compile": {"choices": [True, "fast"]}}},
            r"sample\.compile = 'fast' is not allowed",
        ),
        ({"space": {"train.lr": {"low": 0.001, "high": 0.01}}}, r"train\.p_uncond = \[0\.1, 0\.5\]: a trial"),
        ({"objective": "fid_is"}, r"search\.w = \[0\.0, 1\.0\]: objective fid_is scores one"),
        (
            {"pruner": "percentile", "pruner_options": {}},
            r"do not fit search\.pruner 'percentile': PercentilePruner",
        ),
        ({"grace_period": 2, "heartbeat_interval": 2}, r"grace_period = 2 must exceed search\.heartbeat"),
        ({"n_samples_cheap": 100}, r"n_samples_cheap = 100 must not exceed sample\.n_samples = 40"),
    ],
)
def test_bad_search_sections_are_refused_with_the_key_and_value(tmp_path, change, message):
    raw = tiny_raw(tmp_path, **change)
    with pytest.raises((SearchError, ValueError), match=message):
        check_search(raw)


def test_a_float_range_may_have_whole_number_bounds_but_p_uncond_choices_need_decimals(tmp_path):
    """suggest_float's values are floats, so a range {low: 0, high: 1} of train.p_uncond is checked at 0.0 and 1.0
    (train.p_uncond refuses an integer: DVC would name the model's folder p_uncond=0); choices are used as written."""
    spec = check_search(tiny_raw(tmp_path, space={"train.p_uncond": {"low": 0, "high": 1, "step": 0.1}}))
    (dim,) = [d for d in spec.space if d.key == "train.p_uncond"]
    assert (dim.low, dim.high, dim.step) == (0.0, 1.0, 0.1) and isinstance(dim.low, float)
    with pytest.raises(SearchError, match=r"p_uncond\[0\] = 0 must be written with a decimal point"):
        check_search(tiny_raw(tmp_path, space={"train.p_uncond": {"choices": [0, 0.5]}}))


def test_cli_reports_the_error_in_one_line_before_loading_anything(tmp_path):
    params = write_params(tmp_path, tiny_raw(tmp_path, space={"train.lr": {"low": 1, "high": 0.5}}))
    missing = {key: tmp_path / "missing" for key in ("data", "classifier", "reference")}
    out = run(worker_cmd(params, missing, tmp_path / "out"), tmp_path, check=False)
    assert out.returncode != 0
    assert "error: params.yaml: search.space.train.lr: low = 1 must be below high = 0.5" in out.stderr


# ---------------------------------------------------------------------------------------------------------
# Real studies on SQLite, in process


def test_single_objective_study_prunes_logs_to_mlflow_and_writes_best_params(tmp_path, inputs):
    spec = check_search(tiny_raw(tmp_path, n_trials=3))
    # queued first: a learning rate that learns, then one that cannot (its intermediate FID is far worse)
    queued = optuna.create_study(study_name="cfg-search", storage=spec.search.storage)
    for lr in (5e-3, 1e-5):
        queued.enqueue_trial({"train.p_uncond": 0.2, "train.lr": lr, "train.steps": 20})
    study = run_worker(spec, inputs, log=lambda _: None)

    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(3))
    assert {t.state for t in trials} <= set(FINISHED)
    assert trials[0].state == TrialState.COMPLETE and trials[1].state == TrialState.PRUNED
    assert list(trials[1].intermediate_values) == [10], "pruned at the first checkpoint"
    assert trials[1].intermediate_values[10] > trials[0].intermediate_values[10]

    (best,) = best_trials(study)
    assert best.value == min(t.value for t in trials if t.state == TrialState.COMPLETE)
    overrides = yaml.safe_load(best_params_yaml(study, best))
    assert overrides == {
        "train.p_uncond": [best.params["train.p_uncond"]],
        "train.lr": pytest.approx(best.params["train.lr"], rel=1e-11),
        "train.steps": best.params["train.steps"],
        "sample.w": [0.0, 1.0],
    }
    assert best.user_attrs["w"] in (0.0, 1.0)
    # the file is a valid override set of params.yaml, applied with `dvc exp run -S`
    params = write_params(tmp_path, tiny_raw(tmp_path))
    cmd = exp_run_command(overrides, params_file=params)
    assert cmd[:3] == ["dvc", "exp", "run"] and f"train.steps={best.params['train.steps']}" in cmd
    p = trial_params(spec, overrides)
    assert p.train.p_uncond == overrides["train.p_uncond"] and p.sample.w == [0.0, 1.0]

    # MLflow: a study run, and one run per trial nested under it with params, metrics and tags
    con = sqlite3.connect(tmp_path / "mlflow.db")
    runs = dict(con.execute("select name, run_uuid from runs"))
    assert set(runs) == {"search cfg-search", *(f"trial {i}" for i in range(3))}
    parent = runs["search cfg-search"]
    assert study.user_attrs["mlflow_run_id"] == parent
    for t in trials:
        rid = runs[f"trial {t.number}"]
        tags = dict(con.execute("select key, value from tags where run_uuid = ?", (rid,)))
        assert tags["mlflow.parentRunId"] == parent
        assert (tags["optuna.trial_number"], tags["optuna.study_name"]) == (str(t.number), "cfg-search")
        assert tags["optuna.state"] == t.state.name
        logged = dict(con.execute("select key, value from params where run_uuid = ?", (rid,)))
        assert float(logged["train.lr"]) == pytest.approx(t.params["train.lr"], rel=1e-11)
        metrics = {k for (k,) in con.execute("select key from metrics where run_uuid = ?", (rid,))}
        assert "fid_cheap" in metrics or t.params["train.steps"] <= 10
        if t.state == TrialState.COMPLETE:
            fid = con.execute("select value from latest_metrics where run_uuid = ? and key = 'fid'", (rid,))
            assert fid.fetchone()[0] == pytest.approx(t.value)
            assert {"fid_w0", "fid_w1", "is", "w"} <= metrics

    # a second worker on the finished study runs nothing more
    again = run_worker(spec, inputs, log=lambda _: None)
    assert len(again.get_trials()) == 3
    s = summary(again)
    assert s["states"]["complete"] + s["states"]["pruned"] == 3 and s["best"][0]["number"] == best.number


@pytest.mark.slow
def test_multi_objective_study_returns_the_pareto_front_after_cheap_passes(tmp_path, inputs):
    space = {
        "train.lr": {"low": 1e-5, "high": 1e-2, "log": True},
        "sample.w": {"low": 0.0, "high": 3.0},
    }
    raw = tiny_raw(tmp_path, objective="fid_is", n_trials=5, space=space)
    raw["train"]["p_uncond"] = [0.2]
    study = run_worker(check_search(raw), inputs, log=lambda _: None)

    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(study.get_trials()) == 5 and done
    front = best_trials(study)
    assert front and [t.values[0] for t in front] == sorted(t.values[0] for t in front)
    for t in front:  # nothing completed dominates a front member
        assert not any(o.values[0] <= t.values[0] and o.values[1] > t.values[1] for o in done)
        assert not any(o.values[0] < t.values[0] and o.values[1] >= t.values[1] for o in done)
    for t in study.get_trials():  # every trial had its cheap pass; pruned ones were dominated in it
        assert len(t.user_attrs["cheap"]) == 2
        if t.state == TrialState.PRUNED:
            assert not t.intermediate_values
    s = summary(study)
    assert [e["number"] for e in s["pareto_front"]] == [t.number for t in front]
    assert s["pareto_front"][0]["overrides"]["sample.w"] == [pytest.approx(front[0].params["sample.w"])]


# ---------------------------------------------------------------------------------------------------------
# Several workers: PostgreSQL, the exact budget, a worker killed mid-trial


@pytest.fixture(scope="module")
def pg_server():
    if postgres.server_bin() is None:
        pytest.skip(
            f"PostgreSQL server binaries not found under {postgres.SEARCH_GLOB}: apt-get install postgresql"
        )
    with postgres.postgres_server() as url:
        yield url


@pytest.mark.slow
def test_two_workers_on_postgres_run_exactly_n_trials(tmp_path, input_files, pg_server, monkeypatch):
    storage = storage_url(postgres.create_database(pg_server, "optuna_two_workers"))
    tracking = postgres.create_database(pg_server, "mlflow_two_workers").replace(":", "+psycopg2:", 1)
    raw = tiny_raw(tmp_path, n_trials=7, storage=storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    params = write_params(tmp_path, raw)
    workers = [
        start_worker(worker_cmd(params, input_files, tmp_path / f"out{i}"), tmp_path, tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    for i, w in enumerate(workers):
        assert w.wait(timeout=600) == 0, (tmp_path / f"w{i}.log").read_text()

    study = optuna.load_study(study_name="cfg-search", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(7)), "trials lost or duplicated"
    assert all(t.state in FINISHED for t in trials)
    assert study.user_attrs["workers_joined"] == 2
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "one worker ran every trial"
    for i in range(2):  # each worker wrote the results of the whole study
        s = json.loads((tmp_path / f"out{i}" / "summary.json").read_text())
        assert s["trials"] == 7 and s["states"]["running"] == 0
        assert (tmp_path / f"out{i}" / "best_params.yaml").exists()

    # one MLflow run per trial, in the shared PostgreSQL store, nested under the one study run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("cfg-lab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("run_kind") == "search"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(7))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 7


@pytest.mark.slow
def test_a_killed_workers_trial_fails_by_heartbeat_is_retried_and_the_study_completes(tmp_path, input_files):
    # trials of ~10 s, no pruning: worker A is killed while it trains its first trial
    raw = tiny_raw(tmp_path, n_trials=3, pruner="none", pruner_options={}, max_retry=1)
    raw["search"]["space"]["train.steps"] = {"choices": [150]}
    params = write_params(tmp_path, raw)
    storage = raw["search"]["storage"]
    a = start_worker(worker_cmd(params, input_files, tmp_path / "outA"), tmp_path, tmp_path / "a.log")
    deadline = time.time() + 120
    while True:  # wait until A is training a trial
        assert time.time() < deadline and a.poll() is None, (tmp_path / "a.log").read_text()
        try:
            running = optuna.load_study(study_name="cfg-search", storage=storage).get_trials(
                states=(TrialState.RUNNING,)
            )
        except KeyError:  # study not created yet
            running = []
        if running and running[0].user_attrs.get("worker", "").endswith(f":{a.pid}"):
            break
        time.sleep(0.5)
    b = start_worker(worker_cmd(params, input_files, tmp_path / "outB"), tmp_path, tmp_path / "b.log")
    time.sleep(2)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()

    study = optuna.load_study(study_name="cfg-search", storage=storage)
    killed = study.trials[running[0].number]
    assert killed.state == TrialState.FAIL
    (retry,) = [t for t in study.get_trials() if retry_of(t) is not None]
    assert retry_of(retry) == killed.number and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params and retry.user_attrs["worker"].endswith(f":{b.pid}")
    assert len(originals(study)) == 3 and len(study.get_trials()) == 4
    assert all(t.state == TrialState.COMPLETE for t in originals(study) if t.number != killed.number)

    con = sqlite3.connect(tmp_path / "mlflow.db")
    status = dict(con.execute("select name, status from runs"))
    assert status[f"trial {killed.number}"] == "FAILED" and status[f"trial {retry.number}"] == "FINISHED"
    assert json.loads((tmp_path / "outB" / "summary.json").read_text())["retried"] == 1


# ---------------------------------------------------------------------------------------------------------
# The best trial through the pipeline


@pytest.mark.slow
def test_best_params_reproduce_the_trial_through_dvc_exp_run(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["search"].update(
        n_trials=2,
        w=[0.0, 1.0],
        eval_every=10,
        n_samples_cheap=20,
        space={
            "train.p_uncond": {"low": 0.1, "high": 0.3, "step": 0.1},
            "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "model.base_width": {"choices": [8, 16]},
        },
    )
    raw["evaluate"]["seed_ranges"] = 1  # the trial's FID is of all its samples
    raw["sample"]["n_samples"] = 80  # the evaluate stage logs 8 samples per class
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "search section"], project)
    run(["dvc", "repro", "prepare", "classifier", "reference"], project)
    inputs = [
        "--data",
        "data/prepared.pt",
        "--classifier",
        "models/classifier.pt",
        "--reference",
        "data/reference.pt",
    ]
    run(["python", "pipelines/search.py", "run", *inputs, "--out-dir", "results/search"], project)
    assert (project / "optuna.db").exists(), "the default storage is optuna.db at the project root"

    overrides = yaml.safe_load((project / "results" / "search" / "best_params.yaml").read_text())
    best = json.loads((project / "results" / "search" / "summary.json").read_text())["best"][0]
    assert overrides == best["overrides"]
    applied = run(
        ["python", "pipelines/search.py", "apply", "results/search/best_params.yaml", "--run"], project
    )
    assert applied.stdout.startswith("dvc exp run ") and "-S train.lr=" in applied.stdout

    # the experiment ran with the trial's values ...
    exps = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    (exp,) = [rev for base in exps for e in base.get("experiments") or [] for rev in e["revs"]]
    exp_params = exp["data"]["params"]["params.yaml"]["data"]
    for key, value in overrides.items():
        section, name = key.split(".")
        assert exp_params[section][name] == value, key
    # ... so its model was trained with them, and its FID is the trial's
    (p,) = overrides["train.p_uncond"]
    model, meta = load_checkpoint(project / "models" / p_uncond_name(p) / "checkpoint.pt")
    assert meta["train"]["lr"] == overrides["train.lr"] and meta["p_uncond"] == p
    assert model.config.base_width == overrides["model.base_width"]
    cells = read_cells(project / "results" / "cells" / f"{p_uncond_name(p)}.json")
    assert [c.w for c in cells] == overrides["sample.w"] == [0.0, 1.0]
    (cell,) = [c for c in cells if c.w == best["w"]]
    assert cell.metrics["fid"] == pytest.approx(best["fid"], rel=1e-9), "the same model, samples and features"


def test_the_overrides_a_trial_is_reproduced_with_leave_out_only_what_no_result_depends_on():
    # train.device (where it runs), tracking.* and search.* are left out of best_params.yaml; train.devices was
    # too, by a prefix match, although the processes' gradient sum changes the weights
    from cfg.search.space import read_search

    from .conftest import ROOT

    sets = [
        "train.steps=3",
        "train.device=cpu",
        "train.devices=2",
        "tracking.experiment=x",
        "search.n_trials=2",
    ]
    spec = read_search(ROOT / "params.yaml", sets)
    assert spec.pipeline_overrides == {"train.steps": 3, "train.devices": 2}
