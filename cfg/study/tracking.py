"""MLflow at the edge: where runs are stored, logging that never costs a result, the UI and `sync`.

Where. MLFLOW_TRACKING_URI, else ``tracking_uri`` in the untracked ``.cfg-lab.local.yaml`` at the project root,
else ``sqlite:///<project root>/mlflow.db`` with artifacts in ``<project root>/mlartifacts``. The root is taken
from above ``.dvc/tmp/exps/``, so DVC's temporary experiment copies log to the workspace's store. The location
is no DVC param: moving the store reruns nothing, and a password in it reaches neither git nor dvc.lock. Every
URI shown, logged or tagged goes through `masked`; the SQLite stores cfg-lab creates are owner-only (0600).

How. `Tracker.open(stage, experiment)` checks the store within `timeout_s()` seconds (10, or
CFG_LAB_TRACKING_TIMEOUT) before the stage's work, and exits naming the masked store if it does not answer.
After that no tracking error stops a stage: the first one is printed as a warning, and that call and every later
one are queued in ``.mlflow-queue/`` (JSON lines; artifacts copied beside them), which `sync`
(``python -m cfg.study.tracking sync``, ``make sync``) or the next stage's `Tracker.open` replays into the store.
A run the stage leaves open ends FAILED when the process exits (KILLED after SIGTERM, SIGINT or SIGHUP); a run
of a process killed outright (SIGKILL, power loss) is marked KILLED by the next `Tracker.open` or `sync` on its
host. ``CFG_LAB_TRACKING=offline`` queues everything from the start, for a machine that cannot reach the store.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

_EXPS_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
LOCAL_SETTINGS = ".cfg-lab.local.yaml"  # untracked, per checkout: tracking_uri
QUEUE_DIR = ".mlflow-queue"  # logging that did not reach the store, until `sync` replays it
QUEUED = "queued-"  # prefix of the id of a run whose creation is in the queue
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


# ---------------------------------------------------------------------------------------------------------
# Where: the store, its credentials kept out of sight


def local_settings(root: str | Path | None = None) -> dict[str, Any]:
    """<project root>/.cfg-lab.local.yaml, the untracked settings of this checkout ({} without the file)."""
    path = (Path(root) if root else project_root()) / LOCAL_SETTINGS
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
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


def provenance_tags(stage: str, params_hash: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that trace a number to its code and settings: git commit, DVC stage, params hash, host, versions."""
    import torch

    tags = {
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


# ---------------------------------------------------------------------------------------------------------
# The queue: calls that did not reach the store


class _Queue:
    """One process's queue: `<time>-<pid>-<stage>.jsonl.part`, one call per line, renamed to `.jsonl` when the
    process ends; logged files are copied into the folder of the same stem, as they were when logged."""

    def __init__(self, folder: Path, stage: str):
        self.folder, self.stage = folder, stage
        self.path: Path | None = None
        self.calls = 0

    def append(self, call: dict) -> None:
        self._ensure()
        self._write(call)
        self.calls += 1

    def copy(self, src: str | Path) -> str:
        """Keep a logged file for the replay; returns its path relative to the queue folder."""
        self._ensure()
        dest = (
            self.folder / self.path.name.removesuffix(".jsonl.part") / uuid.uuid4().hex[:12] / Path(src).name
        )
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(src, dest)  # a copy, not a link: a file rewritten in place must not change the log
        dest.chmod(0o600)
        return str(dest.relative_to(self.folder))

    def _ensure(self) -> None:
        if self.path is None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            ns = time.time_ns()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}"
            stem = f"{stamp}-{os.getpid()}-{re.sub(r'[^A-Za-z0-9@.=_-]', '_', self.stage)}"
            self.path = self.folder / f"{stem}.jsonl.part"
            self._write({"op": "header", "process": process_id(), "stage": self.stage})

    def close(self) -> Path | None:
        """Hand the file to `sync`; returns its final path (None when nothing was queued)."""
        if self.path is None:
            return None
        done = self.path.with_name(self.path.name.removesuffix(".part"))
        os.replace(self.path, done)
        self.path = None
        return done

    def _write(self, call: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(call, sort_keys=True) + "\n")


def _run_map(folder: Path) -> dict[str, str]:
    """Queued run id -> the id its replay created (runs.json in the queue folder)."""
    path = folder / "runs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------
# The tracker


_TRACKERS: dict[tuple[str, str, str], Tracker] = {}
_SIGNALLED: list[int] = []


def _on_signal(signum: int, frame) -> None:
    _SIGNALLED.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _watch_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT unwind the stage (so its runs end KILLED) where nobody else handles them."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)


class Tracker:
    """Best-effort MLflow logging for one stage process (see the module's docstring).

    `open` checks the store; `start_run`, `log`, `log_artifact`, `end` never raise for a store that fails: the
    call is queued. `finish` ends the runs this process started and hands its queue to `sync`.
    """

    def __init__(self, stage: str, experiment: str, uri: str, root: Path):
        self.stage, self.experiment, self.uri, self.root = stage, experiment, uri, root
        self.client: Any = None
        self.exp_id: str | None = None
        self.queue = _Queue(root / QUEUE_DIR, stage)
        self.offline: str | None = None  # why calls go to the queue; None while they go to the store
        self._open: dict[str, None] = {}  # runs of this process not ended yet, in start order
        self._parents: dict[str, str | None] = {}

    @classmethod
    def open(cls, stage: str, experiment: str, *, root: str | Path | None = None) -> Tracker:
        """The tracker of this process for `stage`, its store checked before any work (exit if it fails);
        runs of killed processes are marked KILLED and queued calls of earlier stages replayed."""
        root = Path(root) if root else project_root()
        uri = tracking_uri(root)
        key = (stage, experiment, uri)
        if key in _TRACKERS:
            return _TRACKERS[key]
        t = cls(stage, experiment, uri, root)
        if os.environ.get("CFG_LAB_TRACKING", "").lower() == "offline":
            t.offline = "CFG_LAB_TRACKING=offline"
            _note(
                f"offline (CFG_LAB_TRACKING=offline): logging is queued in {t.queue.folder} for `make sync`"
            )
        else:
            t.client, t.exp_id = connect(uri, lambda c: experiment_id(c, experiment, uri, root))
            t._housekeeping()
        # a failing call is one warning line (_go_offline), not MLflow's traceback of the SQL statement
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        _watch_signals()
        atexit.register(t._at_exit)
        _TRACKERS[key] = t
        return t

    # -- runs ---------------------------------------------------------------------------------------------

    def start_run(
        self, name: str, params_hash: str, tags: Mapping[str, Any] | None = None, *, own: bool = True
    ) -> str:
        """A new run with `provenance_tags` and this process's id. `own`: the run ends with this process
        (FINISHED by `finish`, else FAILED / KILLED); a run that outlives its process passes own=False."""
        all_tags = provenance_tags(self.stage, params_hash, tags) | {"process": process_id()}
        all_tags = {k: scrub(v) for k, v in all_tags.items()}
        start = _now_ms()
        call = {"op": "create_run", "run": QUEUED + uuid.uuid4().hex, "experiment": self.experiment}
        call |= {"run_name": name, "tags": all_tags, "start_time": start}

        def create() -> str:
            tags = {k: self._resolve(v) if k == "mlflow.parentRunId" else v for k, v in all_tags.items()}
            return self.client.create_run(self.exp_id, start_time=start, tags=tags, run_name=name).info.run_id

        run_id = self._do(call, create) or call["run"]
        if own:
            self._open[run_id] = None
        return run_id

    def log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Params, metrics and tags in one batch; None and NaN metrics are skipped, URLs in values masked."""
        now = _now_ms()
        values = [
            [k, float(v), now, step]
            for k, v in (metrics or {}).items()
            if v is not None and math.isfinite(float(v))
        ]
        params = {k: scrub(v) for k, v in (params or {}).items()}
        tags = {k: scrub(v) for k, v in (tags or {}).items()}
        if not (values or params or tags):
            return
        call = {"op": "log_batch", "run": run_id, "params": params, "metrics": values, "tags": tags}
        self._do(call, lambda: _log_batch(self.client, self._resolve(run_id), call))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to the run's artifacts (under `artifact_path`); queued, it is copied first."""
        call = {"op": "log_artifact", "run": run_id, "artifact_path": artifact_path}
        send = lambda: self.client.log_artifact(self._resolve(run_id), str(path), artifact_path)  # noqa: E731
        self._do(call, send, file=path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED, FAILED or KILLED."""
        self._open.pop(run_id, None)
        end = _now_ms()
        call = {"op": "set_terminated", "run": run_id, "status": status, "end_time": end}

        def send() -> None:
            self.client.set_terminated(self._resolve(run_id), status=status, end_time=end)
            if self.uri.startswith(("http://", "https://")):  # the link MLflow would print, without userinfo
                base = re.sub(r"//[^/]*@", "//", masked(self.uri).rstrip("/"))
                print(f"MLflow run {status.lower()}: {base}/#/experiments/{self.exp_id}/runs/{run_id}")

        self._do(call, send)

    def finish(self) -> None:
        """The last call of a stage that succeeded: its open runs end FINISHED and its queue goes to `sync`."""
        for run_id in list(self._open):
            self.end(run_id)
        self._close_queue()

    # -- runs named by outputs ----------------------------------------------------------------------------

    def checkpoint_run(self, meta: Mapping[str, Any], checkpoint: str | Path, params_hash: str) -> str:
        """The train run a checkpoint names, if this store has it; else (a clone that got the checkpoint from
        the DVC cache, with its own store) a new run of this stage with the checkpoint's provenance: tags
        train_run_id, checkpoint, checkpoint_params_hash, data_fingerprint; the training's params."""
        train_run = meta.get("mlflow_run_id")
        if train_run and self._has_run(train_run):
            return self._resolve(train_run)
        p = meta.get("p_uncond")
        run_id = self.start_run(
            f"sample p_uncond={p}",
            params_hash,
            {
                "run_kind": "sample",
                "train_run_id": train_run or "",
                "checkpoint": str(checkpoint),
                "checkpoint_params_hash": meta.get("params_hash", ""),
                "data_fingerprint": meta.get("data_fingerprint", ""),
            },
        )
        self.log(
            run_id,
            params={
                "p_uncond": p,
                "data.name": meta.get("data_name"),
                **flatten(meta.get("train", {}), "train."),
            },
        )
        _note(f"the checkpoint's MLflow run {train_run} is not in {self.uri}: logging to new run {run_id}")
        return run_id

    def parent_of(self, train_run: str | None) -> str | None:
        """The run a cell nests under: the train run, or where this store lacks it, the run `checkpoint_run`
        made in its stead; None when there is neither."""
        if not train_run:
            return None
        if train_run not in self._parents:
            parent: str | None = self._resolve(train_run)
            if not self._has_run(train_run):
                stand_in = self._read(
                    lambda: self.client.search_runs(
                        [self.exp_id],
                        f"tags.train_run_id = '{train_run}'",
                        max_results=1,
                        order_by=["attributes.start_time DESC"],
                    ),
                    [],
                )
                parent = stand_in[0].info.run_id if stand_in else None
            self._parents[train_run] = parent
        return self._parents[train_run]

    # -- the machinery ------------------------------------------------------------------------------------

    def _do(self, call: dict, send: Callable[[], Any], file: str | Path | None = None) -> Any:
        """send() to the store; once that failed (or offline, or for a run still queued), queue the call (and
        a copy of `file`)."""
        if self.offline is None and not self._waits(call):
            try:
                return send()
            except Exception as e:
                if _permanent(e) and call["op"] != "create_run":
                    _note(
                        f"warning: MLflow refused a {call['op']}, which is dropped: {str(e).splitlines()[0]}"
                    )
                    return None
                self._go_offline(f"{type(e).__name__}: {e}")
        if file is not None:
            try:
                call = call | {"file": self.queue.copy(file)}
            except OSError as e:
                _note(f"warning: {file} cannot be kept for the replay and is not logged: {e}")
                return None
        self.queue.append(call)
        return None

    def _read(self, read: Callable[[], Any], default: Any) -> Any:
        if self.offline is not None:
            return default
        try:
            return read()
        except Exception as e:
            self._go_offline(f"{type(e).__name__}: {e}")
            return default

    def _has_run(self, run_id: str) -> bool:
        """Whether the store has the run (True where it cannot tell: offline, or the run is still queued)."""
        real = self._resolve(run_id)
        if real.startswith(QUEUED) or self.offline is not None:
            return True
        try:
            return self.client.get_run(real).info.lifecycle_stage == "active"
        except Exception as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            self._go_offline(f"{type(e).__name__}: {e}")
            return True

    def _resolve(self, run_id: str) -> str:
        """A queued run's id as its replay created it, once it has been replayed."""
        if not run_id.startswith(QUEUED):
            return run_id
        return _run_map(self.queue.folder).get(run_id, run_id)

    def _waits(self, call: dict) -> bool:
        """The call names a run whose creation is still in a queue: it must follow it there."""
        named = [call.get("tags", {}).get("mlflow.parentRunId")]
        if call["op"] != "create_run":
            named.append(call["run"])
        return any(r and self._resolve(r).startswith(QUEUED) for r in named)

    def _go_offline(self, reason: str) -> None:
        if self.offline is None:
            reason = reason.splitlines()[0]  # SQLAlchemy appends the statement
            self.offline = reason
            _note(
                f"warning: MLflow logging to {masked(self.uri)} failed ({scrub(reason)[:300]}). The stage goes on; "
                f"its logging is queued in {self.queue.folder} for `python -m cfg.study.tracking sync` "
                "(make sync) or the next stage to replay"
            )

    def _close_queue(self) -> None:
        path = self.queue.close()
        if path is not None:
            _note(f"{self.queue.calls} MLflow calls queued in {path}: `make sync` replays them")

    def _housekeeping(self) -> None:
        """At open: end the runs of killed processes, replay what earlier stages queued. Never fatal."""
        try:
            end_runs_of_dead_processes(self.client, [self.exp_id])
            replay(self.client, self.uri, self.root, wait=False)
        except Exception as e:
            _note(f"warning: could not tidy up the MLflow store: {type(e).__name__}: {scrub(str(e))[:300]}")

    def _at_exit(self) -> None:
        status = "KILLED" if _SIGNALLED else "FAILED"
        for run_id in list(self._open):
            self.end(run_id, status)
        self._close_queue()


def _permanent(e: Exception) -> bool:
    return getattr(e, "error_code", None) in _PERMANENT


def _log_batch(client, run_id: str, call: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        metrics=[Metric(k, v, t, s) for k, v, t, s in call["metrics"]],
        params=[Param(k, v) for k, v in call["params"].items()],
        tags=[RunTag(k, v) for k, v in call["tags"].items()],
    )


# ---------------------------------------------------------------------------------------------------------
# Replay


class _Wait(Exception):
    """A queued call names a run that a queue file not replayed yet creates."""


@contextlib.contextmanager
def _flock(path: Path, wait: bool) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _queue_files(folder: Path) -> list[Path]:
    """Queue files ready to replay, oldest first: those handed over, and those of processes that died."""
    ready = []
    for path in sorted(folder.glob("*.jsonl*")):
        if path.name.endswith(".jsonl"):
            ready.append(path)
        elif path.name.endswith(".jsonl.part"):
            with open(path) as f:
                header = json.loads(f.readline() or "{}")
            if not process_alive(header.get("process", "")):
                ready.append(path)
    return ready


def replay(client, uri: str, root: Path, *, wait: bool) -> tuple[int, int]:
    """Replay the queue files under <root>/.mlflow-queue into the store at `uri`, oldest first, each call once;
    returns (files replayed, files left). `wait`: wait for another replay in progress, else leave it to it.

    A queued run is created once: tagged queue_ref=<its queued id>, a second replay finds it, and runs.json maps
    the queued id to the new one (for outputs that name it, and for later queue files). A call the store refuses
    for good (a run it does not have) is dropped with a warning; any other failure stops the replay, to be
    resumed where it stopped.
    """
    folder = root / QUEUE_DIR
    if not folder.is_dir():
        return 0, 0
    with _flock(folder / "replay.lock", wait) as held:
        files = _queue_files(folder)
        if not held:
            return 0, len(files)
        runs, experiments, done = _run_map(folder), {}, 0
        try:
            for path in files:
                _replay_file(client, uri, root, path, runs, experiments)
                done += 1
        except _Wait as e:
            _note(f"replay waits: {e}")
        except Exception as e:
            _note(f"warning: replay stopped at {path.name}: {type(e).__name__}: {scrub(str(e))[:300]}")
        finally:
            if runs:
                _write_private(folder / "runs.json", json.dumps(runs, indent=1, sort_keys=True))
    return done, len(files) - done


def _write_private(path: Path, text: str) -> None:
    """Write an owner-only file atomically (a temporary file beside it, renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _replay_file(client, uri: str, root: Path, path: Path, runs: dict, experiments: dict) -> None:
    folder = path.parent
    progress = path.with_name(path.name + ".done")  # how many of its lines are replayed
    start = int(progress.read_text()) if progress.is_file() else 0
    lines = path.read_text().splitlines()
    for i in range(start, len(lines)):
        try:
            call = json.loads(lines[i])
        except json.JSONDecodeError:  # the last line of a process killed while writing it
            _note(f"warning: {path.name} line {i + 1} is cut off: skipped")
            continue
        _apply(client, call, uri, root, runs, experiments, folder)
        _write_private(progress, str(i + 1))
    path.unlink()
    progress.unlink(missing_ok=True)
    shutil.rmtree(folder / path.name.split(".jsonl")[0], ignore_errors=True)


def _apply(client, call: dict, uri: str, root: Path, runs: dict, experiments: dict, folder: Path) -> None:
    op = call["op"]
    if op == "header":
        return
    tags = {k: runs.get(v, v) if k == "mlflow.parentRunId" else v for k, v in call.get("tags", {}).items()}
    if tags.get("mlflow.parentRunId", "").startswith(QUEUED):
        raise _Wait(f"parent run {tags['mlflow.parentRunId']} is in a queue file not replayed yet")
    if op == "create_run":
        ref, name = call["run"], call["experiment"]
        if ref in runs:
            return
        if name not in experiments:
            experiments[name] = experiment_id(client, name, uri, root)
        found = client.search_runs([experiments[name]], f"tags.queue_ref = '{ref}'", max_results=1)
        if found:  # created by a replay that stopped before it could note it
            runs[ref] = found[0].info.run_id
            return
        created = client.create_run(
            experiments[name],
            start_time=call["start_time"],
            tags=tags | {"queue_ref": ref},
            run_name=call["run_name"],
        )
        runs[ref] = created.info.run_id
        return
    run = runs.get(call["run"], call["run"])
    if run.startswith(QUEUED):
        raise _Wait(f"run {run} is created by a queue file not replayed yet")
    try:
        if op == "log_batch":
            _log_batch(client, run, call | {"tags": tags})
        elif op == "log_artifact":
            client.log_artifact(run, str(folder / call["file"]), call["artifact_path"])
        elif op == "set_terminated":
            client.set_terminated(run, status=call["status"], end_time=call["end_time"])
    except Exception as e:
        if not (_permanent(e) or isinstance(e, FileNotFoundError)):  # retrying cannot help these
            raise
        _note(f"warning: a queued {op} of run {run} cannot be replayed and is dropped: {scrub(str(e))[:300]}")


def sync(root: str | Path | None = None) -> tuple[int, int]:
    """`python -m cfg.study.tracking sync`: end the runs of killed processes of this host and replay the queue
    into the store; returns (files replayed, files left)."""
    root = Path(root) if root else project_root()
    uri = tracking_uri(root)
    client, experiments = connect(uri, lambda c: c.search_experiments(max_results=1000))
    end_runs_of_dead_processes(client, [e.experiment_id for e in experiments])
    return replay(client, uri, root, wait=True)


# ---------------------------------------------------------------------------------------------------------
# What the evaluate and report stages log


def log_cell(tracker: Tracker, record, images, labels, classes: list[str], params_hash: str) -> str:
    """A cell run nested under its model's train run (or its stand-in, `Tracker.parent_of`): the record's
    settings as params (options as one JSON dict each), its metrics, fingerprint tags and a sample grid (up to
    8 uint8 samples of each class)."""
    import tempfile

    from cfg.data.images import class_by_w_tiles, save_grid

    parent = tracker.parent_of(record.train_run_id)
    tags = (
        {"run_kind": "cell", "fingerprint": record.fingerprint}
        | ({"mlflow.parentRunId": parent} if parent else {})
        | {f"fingerprint.{k}": v for k, v in record.fingerprint_detail.items()}
    )
    rid = tracker.start_run(record.name, params_hash, tags)
    per_class = {f"fid_class_{c}": v for c, v in (record.per_class_fid or {}).items()}
    tracker.log(rid, params=record.params(), metrics=record.metrics | per_class)
    n_classes = len(classes)
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, min(8, len(labels) // n_classes))
        tiles = class_by_w_tiles(images[None, : n_classes * per], labels[: n_classes * per], n_classes, per)
        path = Path(tmp) / "samples.png"
        save_grid(
            path, tiles[:, 0].view(n_classes, per, *tiles.shape[2:]), upscale=max(1, 64 // images.shape[-1])
        )
        tracker.log_artifact(rid, path)
    tracker.end(rid)
    return rid


def log_report(
    tracker: Tracker, summary: dict, params_hash: str, plots: Path, table: Path, report: Path
) -> str:
    """The report run: the summary's numbers as metrics, the figures, the table and report.md."""
    rid = tracker.start_run("report", params_hash, {"run_kind": "report"})
    tracker.log(rid, metrics={k: v for k, v in summary.items() if isinstance(v, float)})
    for f in sorted(plots.glob("*.png")):
        tracker.log_artifact(rid, f, "plots")
    tracker.log_artifact(rid, table)
    tracker.log_artifact(rid, report)
    tracker.end(rid)
    return rid


def main(argv: list[str] | None = None) -> None:
    """`python -m cfg.study.tracking ui | uri | sync`."""
    parser = argparse.ArgumentParser(prog="python -m cfg.study.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="start the MLflow UI on localhost against the project's store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    sub.add_parser("uri", help="print the tracking URI in use (password masked)")
    sub.add_parser("sync", help="replay the logging queued in .mlflow-queue/ and end runs of killed stages")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if args.command == "uri":
        print(masked(uri))
        return
    if args.command == "sync":
        done, left = sync()
        print(f"[tracking] replayed {done} queue file(s) into {masked(uri)}; {left} left")
        raise SystemExit(1 if left else 0)
    if uri.startswith(("http://", "https://", "databricks")):
        print(f"the store is a tracking server: its UI is at {masked(uri)}")
        return
    create_private_store(uri)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {masked(uri)})", flush=True)
    os.environ["MLFLOW_BACKEND_STORE_URI"] = uri  # not on the command line, where `ps` shows it
    os.execv(
        sys.executable,
        [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port)],
    )


if __name__ == "__main__":
    main()
