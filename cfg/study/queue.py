"""The MLflow queue: logging calls that did not reach the store, kept as JSON lines under .mlflow-queue/, and
their replay (`sync`, or the next stage's `Tracker.open`), each call once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cfg.study.store import (
    _PERMANENT,
    QUEUE_DIR,
    QUEUED,
    RUN_TAGS,
    _note,
    connect,
    end_runs_of_dead_processes,
    experiment_id,
    process_alive,
    process_id,
    project_root,
    scrub,
    tracking_uri,
)

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


def _log_image(client, run_id: str, path: str | Path, key: str, step: int) -> None:
    """MLflow's own `log_image(key=, step=)`: its file layout (images/ and a thumbnail) is what the UI reads."""
    from PIL import Image

    with Image.open(path) as image:
        client.log_image(run_id, image.copy(), key=key, step=step)


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
    tags = {k: runs.get(v, v) if k in RUN_TAGS else v for k, v in call.get("tags", {}).items()}
    for k in RUN_TAGS:
        if tags.get(k, "").startswith(QUEUED):
            raise _Wait(f"run {tags[k]} ({k}) is in a queue file not replayed yet")
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
        elif op == "log_image":
            _log_image(client, run, folder / call["file"], call["key"], call["step"])
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
