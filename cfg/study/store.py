"""Where MLflow runs are stored and how to reach the store: the project root (also inside DVC's temporary
experiment copies), the tracking URI (MLFLOW_TRACKING_URI, else the untracked .cfg-lab.local.yaml, else
sqlite mlflow.db at the root), masking of credentials, owner-only stores, the timed connection check,
provenance tags, the process identities that let a later stage end the runs of a killed one, and the study a
stage belongs to (the `dvc repro` / `dvc exp run` that runs it). See `cfg.study.tracking` for the logging itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EXPS_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
LOCAL_SETTINGS = ".cfg-lab.local.yaml"  # untracked, per checkout: tracking_uri
QUEUE_DIR = ".mlflow-queue"  # logging that did not reach the store, until `sync` replays it
QUEUED = "queued-"  # prefix of the id of a run whose creation is in the queue
RUN_TAGS = (
    "mlflow.parentRunId",
    "model_run_id",
)  # tags that name another run: a queued id is replaced on replay
# errors of the call itself, not of the store: retrying cannot help, so the call is dropped with a warning
_PERMANENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS")


def project_root(start: str | Path | None = None) -> Path:
    """The project folder, looking through DVC's temporary experiment copies to the workspace they came from."""
    here = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    text = str(here) + os.sep
    if _EXPS_MARKER in text:
        return Path(text.split(_EXPS_MARKER)[0])
    for parent in (here, *here.parents):
        if (parent / "dvc.yaml").exists() or (parent / ".git").exists():
            return parent
    return here


def data_root(root: str | None) -> str | None:
    """A relative data root (or weights file) is taken from the project root, also inside DVC's temporary
    experiment copies."""
    if root is None or Path(root).is_absolute():
        return root
    return str((project_root() / root).resolve())


# ---------------------------------------------------------------------------------------------------------
# Where: the store, its credentials kept out of sight


def local_settings(root: str | Path | None = None) -> dict[str, Any]:
    """<project root>/.cfg-lab.local.yaml, the untracked settings of this checkout ({} without the file)."""
    path = (Path(root) if root else project_root()) / LOCAL_SETTINGS
    if not path.is_file():
        return {}
    from cfg.io import load_yaml

    data = load_yaml(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"tracking_uri"}:
        raise SystemExit(f"error: {path}: a mapping with the key tracking_uri, got {sorted(data)!r}")
    if path.stat().st_mode & 0o077:
        _note(f"warning: {path} is readable by other users; `chmod 600 {path}` if it holds a password")
    return data


def tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else tracking_uri in .cfg-lab.local.yaml, else sqlite:///<project root>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root) if root else project_root()
    configured = local_settings(root).get("tracking_uri")
    return str(configured) if configured else f"sqlite:///{root / 'mlflow.db'}"


# user:password@ of a URL's authority; a password may hold unescaped '@' or '/' (the last '@' before the host ends it)
_USERINFO = re.compile(r"(?P<user>[^:/?#@]*):(?P<password>.*)@(?P<rest>[^@/?#]*(?:[/?#].*)?)$", re.S)
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.I)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def masked(uri: str) -> str:
    """`uri` with its password and secret query values as ***, e.g. postgresql://user:***@host/db: the form
    in which a URI is printed, logged or tagged."""
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        return str(uri)
    m = _USERINFO.match(rest)
    if m:
        rest = f"{m['user']}:***@{m['rest']}"
    head, q, query = rest.partition("?")
    if q:
        parts = [p.split("=", 1) for p in query.split("&")]
        query = "&".join(
            f"{p[0]}=***" if len(p) == 2 and _SECRET_KEY.search(p[0]) else "=".join(p) for p in parts
        )
        rest = f"{head}?{query}"
    return f"{scheme}://{rest}"


def scrub(text: str) -> str:
    """`text` with every URL in it `masked`: for error messages and free-form values."""
    return _URL.sub(lambda m: masked(m.group()), str(text))


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for other stores and in-memory databases."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def create_private_store(url: str) -> None:
    """Create a SQLite store's file empty and owner-only (0600) unless it exists; MLflow, Optuna and SQLite
    would create it world-readable, and SQLite keeps the mode of the file it finds (journals included)."""
    path = sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def timeout_s() -> float:
    """Seconds a store has to answer the check before a stage's work: CFG_LAB_TRACKING_TIMEOUT, default 10."""
    raw = os.environ.get("CFG_LAB_TRACKING_TIMEOUT", "10")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SystemExit(f"error: CFG_LAB_TRACKING_TIMEOUT = {raw!r} must be a number of seconds > 0")
    return value


# ---------------------------------------------------------------------------------------------------------
# Tags


def git_commit(root: str | Path | None = None) -> str:
    """HEAD of the project's git repository, with '-dirty' when tracked files differ; 'unknown' without git."""
    cwd = Path(root) if root else project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def _mlflow_context_tags() -> dict[str, str]:
    """The tags MLflow's fluent `mlflow.start_run` adds (its context registry): mlflow.user, mlflow.source.name
    (the stage script), mlflow.source.type, mlflow.source.git.commit / branch / repoURL, which fill the UI's User,
    Source and Version columns. Once per process: they name the process, not the run."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: str(v) for k, v in resolve_tags().items()}


def provenance_tags(stage: str, params_hash: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that trace a number to its code and settings: git commit, DVC stage, params hash, host, versions,
    and MLflow's own source, commit and user tags."""
    import torch

    tags = _mlflow_context_tags() | {
        "git_commit": git_commit(Path.cwd()),
        "dvc_stage": stage,
        "params_hash": params_hash,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


# ---------------------------------------------------------------------------------------------------------
# The study: one `dvc repro` or `dvc exp run`


# the process whose study a stage belongs to, where it is not the DVC process that runs the stage
STUDY_PID_ENV = "CFG_LAB_STUDY_PID"


@dataclass(frozen=True)
class Study:
    """The DVC run a stage belongs to; its MLflow run is the parent of the stage's runs (`Tracker.study_run`)."""

    key: str  # tag `study` of its runs: a hash of the DVC process's identity, unique per host and boot
    name: str  # the study run's name: the DVC experiment's, else "repro <start time>"
    process: str  # process_id of the DVC process: the study run of a DVC killed outright ends KILLED
    started: float  # when the DVC process started, seconds since the epoch
    command: str  # the DVC command line, from `dvc` on ("" where it cannot be read)


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _is_ancestor(pid: int) -> bool:
    """Whether process `pid` is a parent, grandparent, … of this process."""
    at = os.getppid()
    while at not in (None, 0, 1):
        if at == pid:
            return True
        at = _parent_pid(at)
    return False


def _runs_a_stage(pid: int) -> bool:
    """Whether DVC_STAGE is in the environment process `pid` was started with (False where it cannot tell)."""
    try:
        return any(
            v.startswith(b"DVC_STAGE=") for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        )
    except OSError:
        return False


def _started_at(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux: its start ticks after the boot time)."""
    ticks = _start_ticks(pid)
    try:
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration):
        return None
    return boot + int(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None


def _command(pid: int) -> str:
    """Process `pid`'s command line from its `dvc` argument on (the Python interpreter before it dropped)."""
    try:
        argv = [
            a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a
        ]
    except OSError:
        return ""
    at = next((i for i, a in enumerate(argv) if os.path.basename(a) == "dvc"), 0)
    return " ".join(["dvc", *argv[at + 1 :]] if at or argv[:1] == ["dvc"] else argv)


def current_study() -> Study | None:
    """The study of this stage process: the DVC process that runs it (`dvc repro`, `dvc exp run`, or for a
    queued experiment `dvc exp exec-run`), found as the nearest ancestor started without DVC_STAGE, which DVC
    sets for the stage command only (so a shell, torchrun or its ranks in between are passed over). Every stage
    of one DVC run finds the same process, two DVC runs (concurrent `dvc queue` workers too) different ones.
    None outside DVC: a stage started by hand belongs to no study. Without /proc: the parent process.
    Under `cfg-lab repro --parallel`, which starts one DVC process per arm, the study is that cfg-lab process
    (STUDY_PID_ENV, which it sets for its DVC processes), so every arm's runs share one study run."""
    if not os.environ.get("DVC_STAGE"):
        return None
    owner = os.environ.get(STUDY_PID_ENV, "")
    if owner.isdigit() and _is_ancestor(int(owner)):  # a stale or exported value names no ancestor: ignored
        pid = int(owner)
    else:
        pid = os.getppid()
        while _runs_a_stage(pid) and (parent := _parent_pid(pid)) not in (None, 0, 1):
            pid = parent
    ident = process_id(pid)
    started = _started_at(pid) or time.time()
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("repro %Y-%m-%d %H:%M:%S", time.localtime(started))
    return Study(hashlib.sha256(ident.encode()).hexdigest()[:16], name, ident, started, _command(pid))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists become their JSON-ish string."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _start_ticks(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_id(pid: int | None = None) -> str:
    """host:pid:start-time of a process: the `process` tag, which tells a live run from one of a killed stage."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def process_alive(ident: str) -> bool:
    """Whether the process a `process_id` names still runs; True for another host's (this one cannot tell)."""
    try:
        host, pid, start = ident.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    now = _start_ticks(pid_n)
    if now is not None:
        return not start or now == start  # the same pid with another start time is a new process
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ---------------------------------------------------------------------------------------------------------
# The store: a bounded check, experiments


def _note(message: str) -> None:
    print(f"[tracking] {scrub(message)}", file=sys.stderr, flush=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _within(limit: float, call: Callable[[], Any]) -> Any:
    """call() in a thread, or TimeoutError after `limit` seconds (the thread is left to finish or hang)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="mlflow-check")
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {limit:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def connect(uri: str, check: Callable[[Any], Any]) -> tuple[Any, Any]:
    """(MlflowClient, check(client)) once the store at `uri` answered within timeout_s(); else exit, naming the
    masked store, before anything was computed. A SQLite file must be free to write (no other writer holding
    it) and another database must accept a connection in time; then MLflow may take what a new store's tables
    take. Any other store (a tracking server) must answer `check` in time, MLflow's retries off.

    Later calls get MLflow's HTTP settings MLFLOW_HTTP_REQUEST_TIMEOUT = timeout_s(), _MAX_RETRIES = 2,
    _BACKOFF_FACTOR = 1 unless set: a dead server costs a stage one call of about 3 s (refused) to 35 s (no
    answer), not MLflow's default of minutes; a locked SQLite store costs one call of MLflow's 20 s busy timeout.
    """
    from mlflow.tracking import MlflowClient

    limit = timeout_s()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(limit)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # MLflow prints "View run ... at: <tracking URI>", password included; Tracker.end prints it without
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    path = sqlite_file(uri)
    try:
        if path is not None:
            create_private_store(uri)
            con = sqlite3.connect(path, timeout=limit, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")  # waits up to `limit` for another writer's lock
                con.execute("ROLLBACK")
            finally:
                con.close()
            client = MlflowClient(tracking_uri=uri)
            return client, check(client)
        if uri.split("://")[0].split("+")[0] in ("postgresql", "mysql", "mssql"):
            _within(limit, lambda: _ping_database(uri))
            client = MlflowClient(tracking_uri=uri)
            return client, check(client)
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"):
            client = _within(limit, lambda: MlflowClient(tracking_uri=uri))
            return client, _within(limit, lambda: check(client))
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0]
        raise SystemExit(
            f"error: the MLflow store {masked(uri)} failed its check ({type(e).__name__}: {scrub(reason)[:300]}; "
            f"waited at most {limit:g} s), so this stopped before any work. Start the server or fix "
            f"MLFLOW_TRACKING_URI / tracking_uri in {LOCAL_SETTINGS}; or set CFG_LAB_TRACKING=offline to queue "
            "the logging for `make sync`, or CFG_LAB_TRACKING_TIMEOUT to wait longer"
        ) from None


def _ping_database(uri: str) -> None:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    with sqlalchemy.create_engine(uri, poolclass=NullPool).connect() as con:
        con.execute(sqlalchemy.text("SELECT 1"))


def experiment_id(client, name: str, uri: str, root: Path) -> str:
    """The experiment's id, creating it (file stores: with an owner-only artifact folder beside the store)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")):
        artifacts = root / "mlartifacts"
        artifacts.mkdir(mode=0o700, parents=True, exist_ok=True)
        location = artifacts.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def end_runs_of_dead_processes(client, experiment_ids: list[str]) -> int:
    """Mark KILLED the RUNNING runs of this host whose process (tag `process`) is gone; returns how many."""
    host = socket.gethostname()
    n = 0
    for run in client.search_runs(
        experiment_ids, f"attributes.status = 'RUNNING' and tags.host = '{host}'", max_results=1000
    ):
        ident = run.data.tags.get("process")
        if ident and not process_alive(ident):
            client.set_terminated(run.info.run_id, status="KILLED")
            _note(
                f"run {run.info.run_name!r} ({run.info.run_id}) of a killed process ({ident}) marked KILLED"
            )
            n += 1
    return n
