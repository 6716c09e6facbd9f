"""Tracking trouble never costs a result, and no secret leaves the process.

A locked mlflow.db, a tracking server that does not answer or dies mid-training, a stage killed by a signal, a
clone whose store lacks the train runs: the stages keep their outputs, what they could not log is queued and
replayed by `python -m cfg.study.tracking sync`, and their runs end KILLED/FAILED. A password planted in the
tracking URI and in search.storage is then searched for in every output, the MLflow store, dvc.lock and git.
A stage whose file system fills up (a file-size limit, and a tmpfs where mounting is permitted) keeps its
previous output and says which file and why; a truncated or bit-flipped input stops the next stage with the file
and the stage to rerun, and nothing downstream is touched.
Real components throughout: the tiny project copy, `dvc repro`, `mlflow server` on 127.0.0.1, SQLite, PostgreSQL.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from cfg.search.storage import storage_url, study_lock
from cfg.study.config import ParamsError, params_from_dict
from cfg.study.queue import sync
from cfg.study.store import QUEUE_DIR, masked, scrub, tracking_uri
from cfg.study.tracking import Tracker

from . import postgres
from .conftest import ROOT, VENV_BIN, shrink_params, up_to_date

SECRET = f"planted-{uuid.uuid4().hex[:12]}"  # drawn per run: not even this file holds it
TRAIN = ["python", "pipelines/train.py", "--p-uncond", "0.1", "--data", "data/prepared.pt"]
TRAIN += ["--out-dir", "models/p_uncond=0.1"]


# ---------------------------------------------------------------------------------------------------------
# helpers


def environ(**extra: str) -> dict[str, str]:
    """The test environment for a stage: the venv first on PATH, no store from the developer's shell."""
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "CFG_LAB_TRACKING", "CFG_LAB_TRACKING_TIMEOUT"):
        env.pop(key, None)
    return env | extra


def sh(cmd: list[str], cwd: Path, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=environ(**extra), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def start(cmd: list[str], cwd: Path, log: Path, **extra: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=environ(**extra), stdout=f, stderr=subprocess.STDOUT)


def wait_for(predicate, what: str, timeout: float = 300, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}:\n{Path(log).read_text() if log else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def query(db: Path, sql: str, *args) -> list[tuple]:
    """Read the MLflow store without holding it (a fresh connection per query)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()


def runs(db: Path) -> dict[str, tuple[str, str]]:
    """run name -> (run id, status)."""
    return {name: (rid, status) for rid, name, status in query(db, "select run_uuid, name, status from runs")}


def tags(db: Path, run_id: str) -> dict[str, str]:
    return dict(query(db, "select key, value from tags where run_uuid = ?", run_id))


def set_params(project: Path, **sections) -> None:
    shrink_params(project / "params.yaml", sections)


def local_store(project: Path, uri: str) -> None:
    """The checkout's own, untracked tracking setting."""
    path = project / ".cfg-lab.local.yaml"
    path.write_text(yaml.safe_dump({"tracking_uri": uri}))
    path.chmod(0o600)


def queue_files(project: Path) -> list[Path]:
    folder = project / QUEUE_DIR
    return sorted(folder.glob("*.jsonl*")) if folder.is_dir() else []


class Server:
    """`mlflow server` on 127.0.0.1 at a free port against a SQLite file, killable mid-run."""

    def __init__(self, folder: Path):
        self.folder, self.db = folder, folder / "server.db"
        folder.mkdir(exist_ok=True)

    def __enter__(self) -> Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = environ(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.log = open(self.folder / f"server-{self.port}.log", "w")
        # its cwd holds ./mlartifacts, where it stores the artifacts it is sent
        self.proc = subprocess.Popen(
            cmd, cwd=self.folder, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, "mlflow server", timeout=180, proc=self.proc, log=self.log.name)
        return self

    def uri(self, password: str = SECRET) -> str:
        return f"http://cfg:{password}@127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.kill()


# ---------------------------------------------------------------------------------------------------------
# fast: masking, the store is no param, owner-only stores, the queue and its replay


def test_masked_hides_the_password_of_every_uri_shown():
    cases = {
        "http://user:PW@host:5000": "http://user:***@host:5000",
        "postgresql+psycopg2://u:p%40ss@h:5432/db": "postgresql+psycopg2://u:***@h:5432/db",
        "postgresql://u:pa/ss@w@h/db": "postgresql://u:***@h/db",  # unescaped '/' and '@' in the password
        "mysql://u:x@h/db?password=zz&ssl=1": "mysql://u:***@h/db?password=***&ssl=1",
        "https://h/api?token=abc": "https://h/api?token=***",
    }
    for uri, shown in cases.items():
        assert masked(uri) == shown
    for plain in ("sqlite:////tmp/a@b/mlflow.db", "http://host:5000/path", "http://user@host", "databricks"):
        assert masked(plain) == plain
    assert (
        scrub(f"request to http://u:{SECRET}@127.0.0.1:1/api failed")
        == "request to http://u:***@127.0.0.1:1/api failed"
    )


def test_the_store_is_no_dvc_param_and_params_refuse_secrets(tmp_path, monkeypatch):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    read = {name: s.get("do", s).get("params", []) for name, s in stages.items()}
    assert not [
        n for n, keys in read.items() if any(str(k).startswith("tracking") for k in keys) and n != "report"
    ]
    assert "tracking.experiment" in read["report"] and "tracking" not in read["report"], "report.md names it"
    assert "uri" not in yaml.safe_load((ROOT / "params.yaml").read_text())["tracking"]

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"MLFLOW_TRACKING_URI .*\.cfg-lab\.local\.yaml"):
        params_from_dict(raw | {"tracking": {"uri": f"http://u:{SECRET}@h", "experiment": "x"}})
    with pytest.raises(ParamsError, match="PGPASSWORD") as refused:
        params_from_dict(raw | {"search": raw["search"] | {"storage": f"postgresql://u:{SECRET}@h/db"}})
    assert SECRET not in str(refused.value) and "u:***@h" in str(refused.value)

    # MLFLOW_TRACKING_URI, else the untracked local file, else mlflow.db at the root
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    local_store(tmp_path, "http://h:1")
    assert tracking_uri(tmp_path) == "http://h:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert tracking_uri(tmp_path) == "http://env:2"
    for ignore in (".gitignore", ".dvcignore"):
        lines = (ROOT / ignore).read_text().splitlines()
        assert "/.cfg-lab.local.yaml" in lines and f"/{QUEUE_DIR}/" in lines, ignore


def test_stores_and_queue_are_created_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    t = Tracker.open("owner-only", "cfg-lab", root=tmp_path)
    t.start_run("r", "h")
    t.finish()
    monkeypatch.delenv("CFG_LAB_TRACKING")
    assert sync(tmp_path) == (1, 0)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode["mlflow.db"] == 0o600 and mode["mlartifacts"] == 0o700 and mode[QUEUE_DIR] == 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / QUEUE_DIR).iterdir() if p.is_file()} == {0o600}
    assert (Path(storage_url(None, root=tmp_path).removeprefix("sqlite:///")).stat().st_mode & 0o777) == 0o600
    lock = study_lock(f"sqlite:///{tmp_path / 'other.db'}", "s")
    lock.close()
    assert (tmp_path / "other.db").stat().st_mode & 0o777 == 0o600


def test_queue_replays_once_across_files_and_interrupted_replays(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CFG_LAB_TRACKING", "offline")
    # a train stage logs offline: its run exists only as a queued id, which its checkpoint would carry
    train = Tracker.open("train@q", "cfg-lab", root=tmp_path)
    run = train.start_run("train q", "h", {"run_kind": "train"})
    assert run.startswith("queued-")
    train.log(run, params={"search.storage": f"postgresql://u:{SECRET}@h/db"})
    for step in (10, 20):
        train.log(run, metrics={"loss": 1.0 / step}, step=step)
    (tmp_path / "loss.csv").write_text("step,loss\n")
    train.log_artifact(run, tmp_path / "loss.csv")
    (tmp_path / "loss.csv").write_text("changed after logging\n")  # the queue kept the logged version
    train.finish()
    # ... and a later stage nests a run under it: a second queue file that names the first one's run
    cells = Tracker.open("evaluate@q", "cfg-lab", root=tmp_path)
    cell = cells.start_run("cell q", "h", {"mlflow.parentRunId": cells.parent_of(run)})
    cells.end(cell)
    cells.finish()
    files = queue_files(tmp_path)
    assert len(files) == 2 and all(f.name.endswith(".jsonl") for f in files)
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / QUEUE_DIR, backup)

    monkeypatch.delenv("CFG_LAB_TRACKING")
    assert sync(tmp_path) == (2, 0)
    db = tmp_path / "mlflow.db"
    made = runs(db)
    train_id = made["train q"][0]
    assert {k: v[1] for k, v in made.items()} == {"train q": "FINISHED", "cell q": "FINISHED"}
    assert tags(db, made["cell q"][0])["mlflow.parentRunId"] == train_id
    assert query(db, "select value from params where key = 'search.storage'") == [
        ("postgresql://u:***@h/db",)
    ]
    mapping = json.loads((tmp_path / QUEUE_DIR / "runs.json").read_text())
    assert mapping[run] == train_id
    assert (tmp_path / "mlartifacts" / train_id / "artifacts" / "loss.csv").read_text() == "step,loss\n"

    # a replay cut off after it created the runs but before it could note them: replayed again, nothing doubles
    shutil.rmtree(tmp_path / QUEUE_DIR)
    shutil.copytree(backup, tmp_path / QUEUE_DIR)
    assert sync(tmp_path) == (2, 0)
    assert len(runs(db)) == 2
    assert query(db, "select count(*) from metrics where key = 'loss'") == [(2,)]
    assert not queue_files(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# slow: real stages against a locked store, a silent or dying server, signals, a clone, planted passwords


@pytest.mark.slow
def test_store_locked_mid_stage_keeps_the_outputs_and_sync_replays(project):
    set_params(project, train={"p_uncond": [0.1], "steps": 400, "eval_every": 0})
    sh(["dvc", "repro", "prepare", "classifier", "reference"], project)
    db = project / "mlflow.db"
    log = project.parent / "train.log"
    stage = start(["dvc", "repro", "train@0.1"], project, log)
    wait_for(lambda: "train p_uncond=0.1" in runs(db), "the train run", proc=stage, log=log)
    # another writer holds the store for the rest of the stage
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    try:
        assert stage.wait(timeout=600) == 0, log.read_text()
        took = time.monotonic() - locked_at
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out = log.read_text()
    print(f"stage ended {took:.1f} s after the store was locked")
    assert "warning: MLflow logging to sqlite:///" in out and "database is locked" in out
    assert out.count("warning: MLflow logging") == 1, "warned once, then queued without trying"
    (queued,) = queue_files(project)
    assert queued.name.endswith(".jsonl")
    ckpt = project / "models" / "p_uncond=0.1" / "checkpoint.pt"
    assert ckpt.stat().st_size > 0
    assert "train@0.1" in yaml.safe_load((project / "dvc.lock").read_text())["stages"], "DVC kept the outputs"

    replayed = sh([sys.executable, "-m", "cfg.study.tracking", "sync"], project)
    assert "replayed 1 queue file(s)" in replayed.stdout
    run_id, status = runs(db)["train p_uncond=0.1"]
    assert status == "FINISHED"
    logged = {k for (k,) in query(db, "select key from latest_metrics where run_uuid = ?", run_id)}
    assert {"loss", "final_loss", "train_images_per_s"} <= logged
    assert query(db, "select max(step) from metrics where run_uuid = ? and key = 'loss'", run_id) == [(400,)]
    art = project / "mlartifacts" / run_id / "artifacts"
    assert (art / "checkpoint.pt").read_bytes() == ckpt.read_bytes()
    assert not queue_files(project)


@pytest.mark.slow
def test_a_store_that_does_not_answer_stops_the_stage_within_the_timeout(project):
    set_params(project, train={"p_uncond": [0.1], "eval_every": 0})
    sh(["dvc", "repro", "prepare"], project)
    stage = [
        "python",
        "pipelines/classifier.py",
        "--data",
        "data/prepared.pt",
        "--out",
        "models/classifier.pt",
    ]
    stage += ["--metrics", "results/classifier.json"]
    baseline = time.monotonic()
    sh(["python", "-c", "import mlflow, torch, cfg.study.tracking"], project)
    imports = time.monotonic() - baseline

    # a server that accepts connections and never answers: the stated 10 s, not MLflow's minutes of retries
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        local_store(project, f"http://cfg:{SECRET}@127.0.0.1:{port}")
        t0 = time.monotonic()
        out = sh(stage, project, check=False)
        silent_s = time.monotonic() - t0
    # nothing listening: refused at once
    local_store(project, f"http://cfg:{SECRET}@127.0.0.1:{port}")
    t0 = time.monotonic()
    refused = sh(stage, project, check=False)
    refused_s = time.monotonic() - t0
    # a SQLite store held by another writer, with a shorter stated timeout
    (project / ".cfg-lab.local.yaml").unlink()
    db = project / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        locked = sh(stage, project, check=False, CFG_LAB_TRACKING_TIMEOUT="3")
        locked_s = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    print(
        f"imports {imports:.1f} s; stage exits after {silent_s:.1f} s (silent server, 10 s stated), "
        f"{refused_s:.1f} s (refused), {locked_s:.1f} s (locked SQLite, 3 s stated)"
    )
    for result in (out, refused, locked):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "stopped before any work" in result.stderr and SECRET not in result.stdout + result.stderr
    assert "waited at most 10 s" in out.stderr and "cfg:***@127.0.0.1" in out.stderr
    assert "database is locked" in locked.stderr and "waited at most 3 s" in locked.stderr
    assert 10 <= silent_s < imports + 10 + 15, "the check waited its 10 s, and no more"
    assert refused_s < imports + 15 and 3 <= locked_s < imports + 3 + 15
    assert not (project / "models" / "classifier.pt").exists()


@pytest.mark.slow
def test_server_killed_mid_training_the_stage_finishes_and_sync_replays(project, tmp_path):
    set_params(project, train={"p_uncond": [0.1], "steps": 400, "eval_every": 0})
    sh(["dvc", "repro", "prepare"], project)
    log = tmp_path / "train.log"
    with Server(tmp_path / "server") as server:
        local_store(project, server.uri())
        stage = start(TRAIN, project, log)
        wait_for(lambda: "train p_uncond=0.1" in runs(server.db), "the train run", proc=stage, log=log)
        server.kill()
        killed_at = time.monotonic()
        assert stage.wait(timeout=600) == 0, log.read_text()
        print(f"stage ended {time.monotonic() - killed_at:.1f} s after the server was killed")
    out = log.read_text()
    assert "warning: MLflow logging to http://cfg:***@127.0.0.1" in out and SECRET not in out
    ckpt = project / "models" / "p_uncond=0.1" / "checkpoint.pt"
    loss = (project / "models" / "p_uncond=0.1" / "loss.csv").read_text().splitlines()
    assert ckpt.stat().st_size > 0 and loss[-1].startswith("400,")
    assert len(queue_files(project)) == 1

    # the server comes back (same store, another port): sync replays what the stage could not log
    with Server(tmp_path / "server") as server:
        local_store(project, server.uri())
        replayed = sh([sys.executable, "-m", "cfg.study.tracking", "sync"], project)
        assert "replayed 1 queue file(s) into http://cfg:***@" in replayed.stdout
        run_id, status = runs(server.db)["train p_uncond=0.1"]
        assert status == "FINISHED"
        assert query(
            server.db, "select value from latest_metrics where run_uuid = ? and key = 'loss'", run_id
        )
        assert query(server.db, "select max(step) from metrics where key = 'loss'") == [(400,)]
        uploaded = list((tmp_path / "server" / "mlartifacts").rglob("checkpoint.pt"))
        assert len(uploaded) == 1 and uploaded[0].read_bytes() == ckpt.read_bytes()
    assert not queue_files(project)


@pytest.mark.slow
def test_a_stopped_stage_ends_its_run_killed_and_a_killed_one_on_the_next_start(project, tmp_path):
    set_params(project, train={"p_uncond": [0.1], "steps": 5000, "eval_every": 0, "checkpoint_every": 0})
    sh(["dvc", "repro", "prepare"], project)
    db = project / "mlflow.db"

    def running_run(proc, log) -> str:
        def started():
            return [rid for rid, s in runs(db).values() if s == "RUNNING" and rid not in seen]

        (rid,) = wait_for(started, "a running train run", proc=proc, log=log)
        seen.add(rid)
        time.sleep(1)  # into the training loop
        return rid

    seen: set[str] = set()
    stage = start(TRAIN, project, tmp_path / "a.log")
    stopped = running_run(stage, tmp_path / "a.log")
    stage.send_signal(signal.SIGTERM)  # what `dvc` or a job scheduler sends
    assert stage.wait(timeout=120) != 0
    assert dict((r, s) for r, s in runs(db).values())[stopped] == "KILLED"

    stage = start(TRAIN, project, tmp_path / "b.log")
    killed = running_run(stage, tmp_path / "b.log")
    stage.send_signal(signal.SIGKILL)  # nothing in the process runs
    stage.wait()
    assert dict(runs(db).values())[killed] == "RUNNING"
    out = sh([sys.executable, "-m", "cfg.study.tracking", "sync"], project)  # as any stage's start does
    assert dict(runs(db).values())[killed] == "KILLED" and "marked KILLED" in out.stderr
    assert tags(db, killed)["process"].split(":")[1] == str(stage.pid)


SWALLOWED_STOP = """
import os, signal, sys, time
from cfg.study import tracking
tracking._watch_signals()
class Collected:
    def __del__(self):  # as SQLAlchemy's and MLflow's garbage-collection callbacks: Python ignores what they raise
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs in here
            pass
Collected()
for _ in range(50):
    time.sleep(0.01)
print("still running")
"""


@pytest.mark.parametrize("watched", [True, False])
def test_a_stop_signal_raised_inside_a_del_is_not_lost(watched):
    """A SIGTERM whose handler runs inside a __del__ (or a weakref callback, where the slow test above once lost
    one in SQLAlchemy's) raises SystemExit there, which Python prints and ignores: cfg's unraisable hook delivers it
    again, and the process ends with 143. Without cfg's handlers the default action kills it outright (-15), so the
    case with them is the one that could go on running."""
    code = SWALLOWED_STOP if watched else SWALLOWED_STOP.replace("tracking._watch_signals()", "")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "still running" not in out.stdout
    assert out.returncode == (128 + signal.SIGTERM if watched else -signal.SIGTERM), out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr


@pytest.mark.slow
def test_sampling_in_a_clone_without_the_train_run_logs_to_a_new_run_with_provenance(
    project, tmp_path, monkeypatch
):
    set_params(project, train={"p_uncond": [0.1], "eval_every": 0})
    sh(["dvc", "repro", "train@0.1"], project)
    sh(["git", "add", "-A"], project)  # dvc.lock and the .gitignore files DVC wrote
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained"], project)
    meta_run = json.loads((project / "models" / "p_uncond=0.1" / "train.json").read_text())["mlflow_run_id"]

    # a teammate's clone: the models through the DVC cache, its own (empty) mlflow.db
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    sh(["dvc", "cache", "dir", "--local", str(project / ".dvc" / "cache")], clone)
    sh(["dvc", "checkout", "--with-deps", "train@0.1"], clone)
    out = sh(["dvc", "exp", "run", "-S", "sample.w=[0.0,1.0]", "sample@0.1"], clone)
    assert "not in sqlite:///" in out.stdout + out.stderr

    db = clone / "mlflow.db"
    ((run_id, status),) = [v for k, v in runs(db).items() if k == "sample p_uncond=0.1"]
    assert status == "FINISHED" and meta_run not in {rid for rid, _ in runs(db).values()}
    t = tags(db, run_id)
    assert t["run_kind"] == "sample" and t["train_run_id"] == meta_run
    assert (
        t["checkpoint"].endswith("models/p_uncond=0.1/checkpoint.pt")
        and len(t["checkpoint_params_hash"]) == 12
    )
    assert t["data_fingerprint"] and t["dvc_stage"] == "sample@0.1"
    params = dict(query(db, "select key, value from params where run_uuid = ?", run_id))
    assert params["p_uncond"] == "0.1" and params["train.steps"] == "30"
    assert query(db, "select key from latest_metrics where run_uuid = ?", run_id) == [
        ("sample_images_per_s",)
    ]
    assert (clone / "mlartifacts" / run_id / "artifacts" / "samples" / "grid.png").stat().st_size > 0
    # the evaluate stage nests the cells under it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert Tracker.open("evaluate@clone", "cfg-lab", root=clone).parent_of(meta_run) == run_id


@pytest.mark.slow
def test_a_planted_password_reaches_no_output_store_lock_file_or_git(project, tmp_path):
    set_params(
        project,
        search={
            "n_trials": 1,
            "w": [0.0],
            "eval_every": 10,
            "n_samples_cheap": 20,
            "space": {"train.p_uncond": {"low": 0.1, "high": 0.2, "step": 0.1}},
        },
    )
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "search"], project)
    shown: list[str] = []

    def keep(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        shown.append(result.stdout + result.stderr)
        return result

    with Server(tmp_path / "server") as server:
        local_store(project, server.uri())
        keep(sh(["dvc", "repro"], project))
        uri = keep(sh([sys.executable, "-m", "cfg.study.tracking", "uri"], project))
        assert uri.stdout.strip() == server.uri("***")
        ui = keep(sh([sys.executable, "-m", "cfg.study.tracking", "ui"], project))
        assert "cfg:***@127.0.0.1" in ui.stdout
        # search.storage with a password: refused in params.yaml, masked when given on the command line
        raw = yaml.safe_load((project / "params.yaml").read_text())
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            yaml.safe_dump(raw | {"search": raw["search"] | {"storage": f"postgresql://u:{SECRET}@h/d"}})
        )
        refused = keep(
            sh(
                ["python", "pipelines/search.py", "--params", str(bad), "best", "--out-dir", "x"],
                project,
                False,
            )
        )
        assert refused.returncode != 0 and "u:***@h" in refused.stderr
        inputs = ["--data", "data/prepared.pt", "--classifier", "models/classifier.pt"]
        inputs += ["--reference", "data/reference.pt", "--out-dir", "results/search"]
        if postgres.server_bin() is not None:
            with postgres.postgres_server() as pg:  # trust authentication: any password is accepted
                storage = postgres.create_database(pg, "planted").replace("postgres@", f"postgres:{SECRET}@")
                searched = keep(
                    sh(["python", "pipelines/search.py", "run", *inputs, "--storage", storage], project)
                )
                assert "postgres:***@127.0.0.1" in searched.stdout + searched.stderr
                storage_tags = query(server.db, "select value from tags where key = 'optuna.storage'")
                assert storage_tags and all("postgres:***@" in v for (v,) in storage_tags)
        n_runs = len(runs(server.db))
    assert n_runs >= 1 + 2 + 6 + 1

    # moving the store reruns nothing: it is no DVC param
    local_store(project, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    status = keep(sh(["dvc", "status"], project))
    assert up_to_date(status.stdout), status.stdout

    leaks = [line for text in shown for line in text.splitlines() if SECRET in line]
    assert not leaks, leaks
    sh(["git", "add", "-A"], project)  # what a careless `git add -A` would commit: the local file is ignored
    committed = (
        sh(["git", "diff", "--cached"], project).stdout + sh(["git", "log", "-p", "--all"], project).stdout
    )
    assert SECRET not in committed
    secret = SECRET.encode()
    searched_files = [p for p in project.rglob("*") if p.is_file() and p.name != ".cfg-lab.local.yaml"]
    searched_files += [
        p for p in (tmp_path / "server").rglob("*") if p.is_file()
    ]  # its store, artifacts, log
    found = [str(p) for p in searched_files if secret in p.read_bytes()]
    assert not found, found
    assert (project / "dvc.lock").is_file() and (tmp_path / "server" / "server.db").is_file()
    assert any((tmp_path / "server" / "mlartifacts").rglob("*.png")), "the artifacts were searched too"


# ---------------------------------------------------------------------------------------------------------
# slow: a full disk under a stage, and damaged inputs that an earlier stage wrote

PREPARE = ["python", "pipelines/prepare.py", "--out", "data/prepared.pt", "--info", "data/prepared.json"]


def file_size_limit(nbytes: int):
    """preexec_fn: writes of the stage beyond `nbytes` fail with EFBIG (SIGXFSZ ignored, as it is inherited)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too: temporary files) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_file_size_limit_mid_stage_keeps_the_previous_output_and_names_file_and_cause(project):
    sh(PREPARE, project)
    before = contents(project / "data")
    set_params(project, data={"max_train": 250})  # the stage would now write other bytes
    limit = len(before["prepared.pt"]) // 2
    out = subprocess.run(
        PREPARE, cwd=project, env=environ(), capture_output=True, text=True, preexec_fn=file_size_limit(limit)
    )
    assert out.returncode != 0
    assert (
        "could not write data/prepared.pt: File too large (EFBIG); the previous prepared.pt is unchanged; raise "
        "the file-size limit (ulimit -f)" in out.stderr
    ), out.stderr
    assert contents(project / "data") == before, "the previous outputs, byte for byte, and no temporary file"

    # no previous output: none afterwards either, and no temporary file
    fresh = [*PREPARE[:3], "data/fresh.pt", "--info", "data/fresh.json"]
    out = subprocess.run(
        fresh, cwd=project, env=environ(), capture_output=True, text=True, preexec_fn=file_size_limit(limit)
    )
    assert (
        out.returncode != 0
        and "could not write data/fresh.pt: File too large (EFBIG); no fresh.pt was written" in out.stderr
    )
    assert contents(project / "data") == before
    sh(PREPARE, project)  # the limit lifted, the stage runs
    assert contents(project / "data")["prepared.pt"] != before["prepared.pt"]


@pytest.mark.slow
def test_a_full_file_system_mid_stage_keeps_the_previous_output_and_names_file_and_cause(project):
    sh(PREPARE, project)
    previous = (project / "data" / "prepared.pt").read_bytes()
    set_params(project, data={"max_train": 250})
    # a tmpfs that holds the previous output but not a second copy beside it (the atomic write's temporary file)
    disk = project / "small-disk"
    disk.mkdir()
    size = (len(previous) * 3 // 2 + 4095) // 4096 * 4096
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "prepared.pt").write_bytes(previous)
        cmd = [*PREPARE[:3], "small-disk/prepared.pt", "--info", "small-disk/prepared.json"]
        out = sh(cmd, project, check=False)
        assert out.returncode != 0
        assert (
            "could not write small-disk/prepared.pt: No space left on device (ENOSPC); the previous prepared.pt "
            "is unchanged; free space on the file system of small-disk" in out.stderr
        ), out.stderr
        assert contents(disk) == {"prepared.pt": previous}, "the previous output intact, no temporary file"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_damaged_inputs_name_the_file_and_the_stage_to_rerun_and_keep_what_is_downstream(project):
    set_params(project, train={"p_uncond": [0.1], "eval_every": 0})
    sh(["dvc", "repro", "evaluate"], project)
    downstream = ["models/p_uncond=0.1", "samples/p_uncond=0.1", "results/cells"]
    kept = {d: contents(project / d) for d in downstream}
    assert "checkpoint.pt" in kept["models/p_uncond=0.1"] and "samples.pt" in kept["samples/p_uncond=0.1"]

    def damaged(path: str, damage) -> bytes:
        original = (project / path).read_bytes()
        (project / path).write_bytes(damage(original))
        return original

    def flip(data: bytes) -> bytes:  # one byte in the middle of the first tensor's data
        data = bytearray(data)
        at = data.find(b"data/0") + 200
        data[at] ^= 0xFF
        return bytes(data)

    cases = [  # (the damaged output, how, the next stage, the message's end)
        (
            "data/prepared.pt",
            lambda b: b[: len(b) // 2],
            [*TRAIN, "--classifier", "models/classifier.pt", "--reference", "data/reference.pt"],
            "prepared data set (BadZipFile: File is not a zip file): the file is truncated or corrupt; make it "
            "again with `dvc repro prepare`",
        ),
        (
            "models/p_uncond=0.1/checkpoint.pt",
            flip,
            ["python", "pipelines/sample.py", "--checkpoint", "models/p_uncond=0.1/checkpoint.pt"]
            + ["--out-dir", "samples/p_uncond=0.1"],
            "U-Net checkpoint (BadZipFile: Bad CRC-32 for file 'archive/data/0')",
        ),
        (
            "samples/p_uncond=0.1/samples.pt",
            lambda b: b[: len(b) - 100],
            [
                "python",
                "pipelines/evaluate.py",
                "--samples",
                "samples",
                "--classifier",
                "models/classifier.pt",
            ]
            + ["--reference", "data/reference.pt", "--out-dir", "results/cells"],
            "sample file (BadZipFile: File is not a zip file): the file is truncated or corrupt; make it again "
            "with `dvc repro sample@0.1`",
        ),
    ]
    for path, damage, stage, message in cases:
        original = damaged(path, damage)
        out = sh(stage, project, check=False)
        assert out.returncode != 0, (path, out.stdout)
        assert f"{path} is not a readable {message}" in out.stderr, out.stderr
        if path.endswith("checkpoint.pt"):
            assert "make it again with `dvc repro train@0.1 (or the step that wrote it)`" in out.stderr
            assert "modified:" in sh(["dvc", "status", "train@0.1"], project).stdout, "DVC sees it too"
        (project / path).write_bytes(original)
        for d in downstream:
            assert contents(project / d) == kept[d], f"{d} changed after {stage[1]} refused {path}"
