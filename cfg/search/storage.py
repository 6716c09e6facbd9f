"""Where a study lives and how its workers share it.

A lock in the storage — a PostgreSQL advisory lock, an flock on the SQLite file — makes "count the trials,
start one" atomic; the storage sends heartbeats so that the trial of a dead worker is failed; `Budget` is where
a study stands against search.n_trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cfg.log import get_logger
from cfg.search.space import SearchError
from cfg.study.config import SearchParams
from cfg.study.store import create_private_store, masked, project_root

# the study's user attribute holding the -S overrides of params.yaml its trials ran with
# (SearchSpec.pipeline_overrides): best_params.yaml puts each trial's values on top of them
STUDY_OVERRIDES = "overrides"


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Heartbeats and their retry callback have been 'experimental' since Optuna 2.8; say so once, here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url(configured: str | None = None, root: str | Path | None = None) -> str:
    """search.storage, else sqlite:///<project root>/optuna.db (absolute: DVC's experiment copies share it).

    A plain postgresql:// URL gets the PostgreSQL driver that is installed: SQLAlchemy 2.1 assumes psycopg 3,
    the `postgres` extra installs psycopg2.
    """
    if not configured:
        url = f"sqlite:///{(Path(root) if root else project_root()) / 'optuna.db'}"
        create_private_store(url)  # owner-only, before Optuna or the study lock creates it
        return url
    if configured.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + configured.removeprefix("postgresql://")
    return configured


class _FileLock:
    """flock on the SQLite file: every worker of a SQLite study runs on this machine."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # held for the worker's life; the OS unlocks it if the worker dies
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.release()
        self._file.close()


class _AdvisoryLock:
    """A PostgreSQL session advisory lock keyed by the study name; the server drops it when a worker dies.

    Its session survives a server restart the way Optuna's pooled connections do (pool_pre_ping): a connection
    the server closed is replaced, and the lock taken again on the new one. A lock held when the server went
    was released with its session: `release` then has nothing left to do."""

    def __init__(self, url: str, study_name: str):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self._key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        self._text = sqlalchemy.text
        self._conn = None
        self._execute("SELECT 1")  # the server answers, or the worker stops here
        self.held = False

    def _execute(self, sql: str) -> None:
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn.execute(self._text(sql), {"k": self._key})

    def _lost(self, error: Exception) -> bool:
        """Whether `error` says the server closed the session (restart, failover); its connection is dropped."""
        from sqlalchemy.exc import DBAPIError

        if not (isinstance(error, DBAPIError) and error.connection_invalidated):
            return False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return True

    def acquire(self) -> None:
        try:
            self._execute("SELECT pg_advisory_lock(:k)")
        except Exception as e:
            if not self._lost(e):
                raise
            self._execute("SELECT pg_advisory_lock(:k)")  # once more, on a new session
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        try:
            self._execute("SELECT pg_advisory_unlock(:k)")
        except Exception as e:
            if not self._lost(e):  # lost: the lock went with its session
                raise
        self.held = False

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
        self._engine.dispose()


# what study_lock returns: both release the lock when their process dies
StudyLock = _FileLock | _AdvisoryLock


def study_lock(url: str, study_name: str) -> StudyLock:
    """The lock that serialises 'count the trials, start one' among all workers of a study."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        return _AdvisoryLock(url, study_name)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
        create_private_store(url)
        return _FileLock(u.database)
    raise SearchError(
        f"search.storage = {masked(url)!r}: workers share a study through a SQLite file (one machine) or "
        "PostgreSQL (several machines)"
    )


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the failed trial that `trial` runs again (as RetryHeartbeatStaleTrialCallback records it)."""
    return trial.system_attrs.get("failed_trial")


@dataclass(frozen=True)
class Budget:
    """Where a study stands against its n_trials."""

    used: int  # trials counted against n_trials: all but the retries of crashed workers' trials
    waiting: int  # queued trials, e.g. retries
    running: int

    @classmethod
    def of(cls, study: optuna.Study) -> Budget:
        trials = study.get_trials(deepcopy=False)
        return cls(
            used=sum(retry_of(t) is None for t in trials),
            waiting=sum(t.state == TrialState.WAITING for t in trials),
            running=sum(t.state == TrialState.RUNNING for t in trials),
        )


class _Storage(optuna.storages.RDBStorage):
    """RDBStorage whose trials keep their heartbeats through a storage outage (a PostgreSQL restart): Optuna's
    heartbeat thread ends at its first error, and the trial, alive, would be failed as stale after
    search.grace_period and run twice. A beat that fails is reported; the next one, heartbeat_interval later,
    goes to the server again (the engine's pool_pre_ping reconnects)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except optuna.exceptions.StorageInternalError as e:
            reason = str(e.__cause__ or e).splitlines()[0]
            get_logger("search").warning(
                f"heartbeat of trial id {trial_id} not recorded ({reason}); next in {self.heartbeat_interval}s"
            )


def open_storage(
    url: str, s: SearchParams, on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None
) -> optuna.storages.RDBStorage:
    """The study's storage with heartbeats: a trial silent for search.grace_period seconds is failed."""
    sqlite = url.startswith("sqlite")
    with experimental_ok():
        return _Storage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True},
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )
