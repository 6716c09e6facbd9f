"""Beyond one machine, played on this one: two git clones of the project share a DVC remote (a directory), one
`mlflow server` (PostgreSQL backend store, a shared artifact root) and one Optuna study on PostgreSQL.

Machine A runs the tiny study (`dvc repro`), pushes the data to the remote and dvc.lock to git; machine B pulls
both and its `dvc repro` recomputes nothing. Then A (one worker) and B (`make search-worker WORKERS=2`) run one
study together: exactly search.n_trials trials, and the runs of both machines in one MLflow experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from analysis.mlflow_ui import mlflow_server
from cfg.nets.unet import load_checkpoint
from cfg.search.space import SearchError
from cfg.search.storage import retry_of, storage_url, study_lock
from cfg.search.worker import worker_slots

from . import postgres
from .conftest import ROOT, VENV_BIN, run, up_to_date

VENV = Path(VENV_BIN).parent  # the test's environment: `make VENV=...` in the clones
N_TRIALS = 4
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
OUTPUTS = (
    "data",
    "models",
    "samples",
    "results",
)  # what `dvc repro` writes (results/: partly git, cache: false)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ---------------------------------------------------------------------------------------------------------
# Worker processes of one machine (fast)


def test_worker_slots_pin_one_worker_per_gpu_or_share_the_cpu():
    assert worker_slots(None, 1, "cpu", 0) == [{}]
    assert worker_slots("0,1", 1, "cuda", 2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert worker_slots("1", 2, "cuda", 2) == [{"CUDA_VISIBLE_DEVICES": "1"}] * 2
    cpu = worker_slots(None, 2, "cpu", 0)
    assert len(cpu) == 2 and all("CUDA_VISIBLE_DEVICES" not in env for env in cpu)
    assert cpu[0]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    for args, message in [
        (("0,1", 1, "cpu", 0), r"train\.device resolves to cpu"),
        (("0,,1", 1, "cuda", 2), r"distinct devices"),
        (("0,0", 1, "cuda", 2), r"distinct devices"),
        (("0,2", 1, "cuda", 2), r"device 2 does not exist, this host has 2 GPUs"),
        ((None, 0, "cpu", 0), r"WORKERS = 0"),
    ]:
        with pytest.raises(SearchError, match=message):
            worker_slots(*args)


def test_gpus_on_a_cpu_machine_are_refused_before_anything_is_loaded(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    missing = [arg for key in ("data", "classifier", "reference") for arg in (f"--{key}", "missing.pt")]
    cmd = [sys.executable, str(ROOT / "pipelines" / "search.py"), "run", *missing, "--out-dir", "out"]
    out = run([*cmd, "--gpus", "0,1"], tmp_path, check=False)
    assert out.returncode != 0
    assert "error: GPUS = '0,1' but train.device resolves to cpu" in out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "optuna.db").exists()


# ---------------------------------------------------------------------------------------------------------
# Two machines (slow)


def tiny_search(params: Path) -> None:
    """One model in the study; the search section shrunk: trials of some seconds, no pruning."""
    raw = yaml.safe_load(params.read_text())
    raw["train"].update(p_uncond=[0.1], batch_size=32)
    raw["search"].update(
        storage=None,  # STORAGE=postgresql://... on the command line, never in params.yaml
        n_trials=N_TRIALS,
        sampler="random",
        sampler_options={},
        pruner="none",
        pruner_options={},
        w=[0.0, 1.0],
        eval_every=50,
        n_samples_cheap=20,
        heartbeat_interval=2,
        grace_period=60,  # no worker dies here: no trial may be failed by a late heartbeat
        space={
            "train.p_uncond": {"low": 0.1, "high": 0.3, "step": 0.1},
            "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "train.steps": {"choices": [100]},
        },
    )
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def env_of(clone: Path, **extra: str) -> dict[str, str]:
    """A machine's shell: the test's Python first on PATH, the clone's own code, no store from the outside."""
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CFG_LAB_TRACKING", None)
    return env | {"PYTHONPATH": str(clone)} | extra


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd} in {cwd.name} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def hashes(clone: Path) -> dict[str, str]:
    """sha256 of every file `dvc repro` wrote, by path."""
    return {
        str(f.relative_to(clone)): hashlib.sha256(f.read_bytes()).hexdigest()
        for top in OUTPUTS
        for f in sorted((clone / top).rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def pg_server():
    if postgres.server_bin() is None:
        pytest.skip(
            f"PostgreSQL server binaries not found under {postgres.SEARCH_GLOB}: bash .ci/postgres.sh"
        )
    with postgres.postgres_server() as url:
        yield url


@pytest.mark.slow
def test_two_clones_share_a_dvc_remote_an_mlflow_server_and_an_optuna_study(project, tmp_path, pg_server):
    from mlflow.tracking import MlflowClient

    # The lab's one-time setup, committed: a DVC remote every machine reaches (here a directory)
    remote = tmp_path / "dvc-remote"
    tiny_search(project / "params.yaml")
    run(["dvc", "remote", "add", "-d", "lab", str(remote)], project)
    run([*GIT, "commit", "-qam", "lab remote, tiny search"], project)
    run(["git", "clone", "-q", "--bare", str(project), str(tmp_path / "origin.git")], tmp_path)
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    for clone in (a, b):
        run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], tmp_path)
    storage = storage_url(postgres.create_database(pg_server, "optuna"))
    backend = postgres.create_database(pg_server, "mlflow").replace(":", "+psycopg2:", 1)
    artifacts = tmp_path / "mlflow-artifacts"

    with mlflow_server(backend, log=tmp_path / "mlflow-server.log", artifacts=artifacts) as server:
        client = MlflowClient(tracking_uri=server)
        env_a = env_of(a, MLFLOW_TRACKING_URI=server)  # A: the environment variable
        (b / ".cfg-lab.local.yaml").write_text(f"tracking_uri: {server}\n")  # B: the untracked local file
        (b / ".cfg-lab.local.yaml").chmod(0o600)
        env_b = env_of(b)

        # Machine A computes the study, pushes the data to the remote and dvc.lock + results to git
        sh(["dvc", "repro"], a, env_a)
        pushed = sh(["dvc", "push"], a, env_a)
        assert re.search(r"\d+ files? pushed", pushed), pushed
        sh(["git", "add", "dvc.lock", "results"], a, env_a)
        sh([*GIT, "commit", "-qm", "the tiny study"], a, env_a)
        sh(["git", "push", "-q", "origin", "HEAD"], a, env_a)
        assert sh(["git", "status", "--porcelain"], a, env_a) == "", "A's outputs are all in git or DVC"
        (exp,) = [e for e in client.search_experiments() if e.name == "cfg-lab"]
        runs_of_a = client.search_runs([exp.experiment_id])
        assert {"train", "cell"} <= {r.data.tags.get("run_kind") for r in runs_of_a}

        # Machine B pulls both; its `dvc repro` recomputes nothing and logs nothing
        sh(["git", "pull", "-q", "--ff-only"], b, env_b)
        assert not (b / "models").exists()
        sh(["dvc", "pull"], b, env_b)
        assert hashes(b) == hashes(a), "B's outputs are A's, from the remote and git"
        status = sh(["dvc", "status"], b, env_b)
        assert up_to_date(status), status
        repro = sh(["dvc", "repro"], b, env_b)
        # only `inputs` runs (on every repro): B's data files hash as A's, so nothing past it reruns
        assert re.findall(r"Running stage '([^']+)'", repro) == ["inputs"], repro
        assert "Stage 'evaluate' didn't change, skipping" in repro, repro
        assert hashes(b) == hashes(a)
        assert len(client.search_runs([exp.experiment_id])) == len(runs_of_a), "B's repro logged a run"
        # B's pulled checkpoint names its train run, on the shared server, artifacts in the shared root
        _, meta = load_checkpoint(b / "models" / "p_uncond=0.1" / "checkpoint.pt")
        train_run = client.get_run(meta["mlflow_run_id"])
        assert train_run.info.experiment_id == exp.experiment_id
        assert train_run.data.tags["run_kind"] == "train"
        assert "checkpoint.pt" in {f.path for f in client.list_artifacts(train_run.info.run_id)}
        assert any(artifacts.rglob("checkpoint.pt")), "the server keeps artifacts in the shared root"

        # One study, both machines: B starts two CPU workers, A one, all held at the study's lock until
        # the three wait there, so that each joins before the budget is spent
        # the test's environment as each machine's .venv, never reinstalled from a clone
        make = ["make", f"VENV={VENV}", "-o", f"{VENV}/.installed", "search-worker", f"STORAGE={storage}"]
        lock = study_lock(storage, "cfg-search")
        lock.acquire()
        logs = {name: tmp_path / f"search-{name}.log" for name in "ab"}
        with open(logs["b"], "w") as out_b, open(logs["a"], "w") as out_a:
            workers = {
                "b": subprocess.Popen([*make, "WORKERS=2"], cwd=b, env=env_b, stdout=out_b, stderr=out_b),
                "a": subprocess.Popen(make, cwd=a, env=env_a, stdout=out_a, stderr=out_a),
            }
        try:
            waiting = 0
            deadline = time.monotonic() + 300
            while waiting < 3:
                for name, w in workers.items():
                    assert w.poll() is None, f"machine {name}'s workers stopped:\n{logs[name].read_text()}"
                assert time.monotonic() < deadline, "the three workers never waited at the study's lock"
                time.sleep(0.5)
                waiting = _advisory_waiters(pg_server)
            # held at the lock, every worker is alive: each machine's processes, as `worker` tags name them
            host = socket.gethostname()
            procs = {name: {f"{host}:{pid}" for pid in _descendants(w.pid)} for name, w in workers.items()}
        finally:
            lock.release()
            lock.close()
        for name, w in workers.items():
            assert w.wait(timeout=600) == 0, f"machine {name}:\n{logs[name].read_text()}"

        launched = re.findall(r"\[search\] worker \d/2: pid (\d+),", logs["b"].read_text())
        assert len(launched) == 2 and {f"{host}:{pid}" for pid in launched} <= procs["b"], launched
        mine = {"a": procs["a"], "b": {f"{host}:{pid}" for pid in launched}}  # B's launcher runs no trial
        study = optuna.load_study(study_name="cfg-search", storage=storage)
        trials = study.get_trials()
        assert sorted(t.number for t in trials) == list(range(N_TRIALS)), "exactly n_trials, none retried"
        assert all(t.state in FINISHED and retry_of(t) is None for t in trials), [t.state for t in trials]
        assert study.user_attrs["workers_joined"] == 3
        by_worker = {t.user_attrs["worker"] for t in trials}
        assert by_worker <= mine["a"] | mine["b"], (by_worker, mine)
        assert by_worker & mine["a"] and by_worker & mine["b"], "a machine ran no trial"
        for clone in (a, b):  # each machine wrote the results of the whole study
            summary = json.loads((clone / "results" / "search" / "summary.json").read_text())
            assert summary["trials"] == N_TRIALS and summary["states"]["running"] == 0

        # Every run of both machines is in one experiment of the one server
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        trial_runs = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
        assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == list(range(N_TRIALS))
        assert {r.data.tags["worker"] for r in trial_runs} == by_worker
        assert {r.info.status for r in trial_runs} <= {"FINISHED", "KILLED", "FAILED"}
        (search_run,) = [r for r in runs if r.data.tags.get("run_kind") == "search"]
        assert search_run.info.status == "FINISHED" and search_run.data.metrics["trials"] == N_TRIALS
        assert {r.info.run_id for r in runs_of_a} <= {r.info.run_id for r in runs}
        assert [e.name for e in client.search_experiments()].count("cfg-lab") == 1


def _advisory_waiters(server_url: str) -> int:
    """Sessions waiting for an advisory lock on the PostgreSQL server (the study's lock)."""
    import psycopg2

    con = psycopg2.connect(f"{server_url}/postgres")
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            return cur.fetchone()[0]
    finally:
        con.close()


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found |= {child, *_descendants(child)}
    return found
