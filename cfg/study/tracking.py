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

Runs. A study is one `dvc repro` or `dvc exp run` (`current_study`): its run (named by the DVC experiment, else
"repro <start time>"; tag `study`, the study's params) is the parent of every classifier, train, sample, cell and
report run its stages log, found or created by the first of them (`Tracker.study_run`). A cell run, named
`p_uncond=0.1 w=0.3`, links its model's run by the tag `model_run_id`. A stage run outside DVC belongs to no study:
its cells nest under their model's run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cfg.study.queue import (
    _flock,
    _log_batch,
    _log_image,
    _permanent,
    _Queue,
    _run_map,
    _write_private,
    replay,
    sync,
)
from cfg.study.store import (
    QUEUE_DIR,
    QUEUED,
    RUN_TAGS,
    Study,
    _note,
    _now_ms,
    connect,
    current_study,
    end_runs_of_dead_processes,
    experiment_id,
    flatten,
    masked,
    process_alive,
    process_id,
    project_root,
    provenance_tags,
    scrub,
    tracking_uri,
)

# runs that nest under the study run of the DVC run that logs them (the search's runs do not: no DVC stage)
STUDY_KINDS = ("classifier", "train", "sample", "cell", "report")
STUDIES = "studies.json"  # in the queue folder: study key -> its run (maybe still queued) and DVC process

# ---------------------------------------------------------------------------------------------------------
# The tracker


_TRACKERS: dict[tuple[str, str, str], Tracker] = {}
_SIGNALLED: list[int] = []


def _on_signal(signum: int, frame) -> None:
    _SIGNALLED.append(signum)
    stop = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
    stop.cfg_lab_signal = signum  # type: ignore[attr-defined]  # for _redeliver_swallowed
    raise stop


def _redeliver_swallowed(unraisable) -> None:
    """sys.unraisablehook: Python runs a signal's handler wherever the main thread is, and an exception raised inside
    a garbage-collection callback or a __del__ (SQLAlchemy's, MLflow's) is printed and ignored, so the stage would
    go on after a SIGTERM. Such a stop is delivered again, from a thread a moment later (sent from here, its handler
    would raise inside this hook, which is ignored too), to be raised once that callback has returned."""
    signum = getattr(unraisable.exc_value, "cfg_lab_signal", None)
    if signum is None:
        _PREVIOUS_UNRAISABLEHOOK[0](unraisable)
        return
    again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
    again.daemon = True
    try:
        again.start()
    except RuntimeError:  # no new threads at interpreter shutdown: the process is ending anyway
        _PREVIOUS_UNRAISABLEHOOK[0](unraisable)


_PREVIOUS_UNRAISABLEHOOK = [sys.unraisablehook]


def _watch_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT unwind the stage (so its runs end KILLED) where nobody else handles them."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)
    if sys.unraisablehook is not _redeliver_swallowed:
        _PREVIOUS_UNRAISABLEHOOK[0] = sys.unraisablehook
        sys.unraisablehook = _redeliver_swallowed


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
        self._study: tuple[Study | None, str | None] | None = None  # (study, its run) once looked up
        self._study_ended = False

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
        """A new run with `provenance_tags` and this process's id, nested under the study run when its
        `run_kind` is one of STUDY_KINDS and no parent is given. `own`: the run ends with this process
        (FINISHED by `finish`, else FAILED / KILLED); a run that outlives its process passes own=False."""
        tags = dict(tags or {})
        if tags.get("run_kind") in STUDY_KINDS and "mlflow.parentRunId" not in tags and self.study_run():
            tags |= {"mlflow.parentRunId": self.study_run(), "study": self._study[0].key}
        all_tags = {"process": process_id()} | provenance_tags(self.stage, params_hash, tags)
        all_tags = {k: scrub(v) for k, v in all_tags.items()}
        start = _now_ms()
        call = {"op": "create_run", "run": QUEUED + uuid.uuid4().hex, "experiment": self.experiment}
        call |= {"run_name": name, "tags": all_tags, "start_time": start}

        def create() -> str:
            tags = {k: self._resolve(v) if k in RUN_TAGS else v for k, v in all_tags.items()}
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

    def log_image(self, run_id: str, path: str | Path, key: str, step: int = 0) -> None:
        """An image file as MLflow's `log_image(key=, step=)` stores it (under images/, with a thumbnail and the
        tag mlflow.loggedImages), so the UI's image grid shows it beside other runs' `key`; queued, it is
        copied first."""
        call = {"op": "log_image", "run": run_id, "key": key, "step": step}
        self._do(call, lambda: _log_image(self.client, self._resolve(run_id), path, key, step), file=path)

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
        self._end_study("FINISHED")
        self._close_queue()

    # -- the study ----------------------------------------------------------------------------------------

    def study_run(self) -> str | None:
        """The run of this stage's study (`current_study`), None outside DVC. Looked up once per process: in
        the queue folder's studies.json (which knows runs still queued), else in the store by the tag
        `study`, else created (with the study's params); a file lock makes the lookup and the creation one
        step for every process of this host, so concurrent stages of a study make one run."""
        if self._study is None:
            study = current_study()
            self._study = (study, self._join(study) if study else None)
        return self._resolve(self._study[1]) if self._study[1] else None

    def _join(self, study: Study) -> str:
        folder = self.queue.folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _flock(folder / "study.lock", wait=True):
            path = folder / STUDIES
            known = json.loads(path.read_text()) if path.is_file() else {}
            run = known.get(study.key, {}).get("run")
            if run is None:
                found = self._read(
                    lambda: self.client.search_runs(
                        [self.exp_id],
                        f"tags.study = '{study.key}' and tags.run_kind = 'study'",
                        max_results=1,
                    ),
                    [],
                )
                run = found[0].info.run_id if found else self._create_study(study)
            # entries of finished DVC runs are done with: no stage of theirs comes any more
            known = {k: v for k, v in known.items() if process_alive(v["process"])}
            # an arm joining after another failed keeps the failure recorded (`_end_study`)
            entry = known.get(study.key, {}) | {"run": run, "process": study.process}
            _write_private(path, json.dumps(known | {study.key: entry}))
        return run

    def _create_study(self, study: Study) -> str:
        """The study run: RUNNING until a stage ends it (`_end_study`); its `process` is the DVC process, so
        it is marked KILLED only when DVC itself was killed. Params: params.yaml's sections but search and
        tracking (the stage's working directory holds the params.yaml DVC runs it with)."""
        try:
            from cfg.study.config import load_params

            params = load_params("params.yaml")
            flat = flatten({k: v for k, v in params.to_dict().items() if k not in ("search", "tracking")})
            params_hash = params.section_hash()
        except (Exception, SystemExit) as e:
            _note(f"warning: the study run gets no params ({type(e).__name__}: {e})")
            flat, params_hash = {}, ""
        tags = {
            "run_kind": "study",
            "study": study.key,
            "process": study.process,
            "dvc_command": study.command,
        }
        tags |= {
            "mlflow.note.content": f"`{study.command}` (started {time.ctime(study.started)} on {study.process.split(':')[0]})"
        }
        run = self.start_run(study.name, params_hash, tags, own=False)
        keys = sorted(flat)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            self.log(run, params={k: flat[k] for k in keys[i : i + 100]})
        return run

    def _end_study(self, status: str) -> None:
        """The study run ends with each of its stages: FINISHED after a stage that succeeded, FAILED or KILLED
        after one that did not; its end time is that stage's end. Once a stage of the study has failed, a later
        stage that succeeds leaves the run FAILED/KILLED (and its end time): the arms of `cfg-lab repro --parallel`
        are concurrent stages of one study, and an arm that finishes after a failed one must not hide the failure.
        The failure is recorded beside the study's run in the queue folder's studies.json, read and written under
        the lock `_join` takes, so it holds for concurrent arms and offline (the queue then never holds a FINISHED
        after the FAILED)."""
        if not (self._study and self._study[1]) or self._study_ended:
            return
        self._study_ended = True
        study, folder = self._study[0], self.queue.folder
        with _flock(folder / "study.lock", wait=True):
            path = folder / STUDIES
            known = json.loads(path.read_text()) if path.is_file() else {}
            entry = known.get(study.key)
            if entry is not None and status != "FINISHED":
                entry["failed"] = status
                _write_private(path, json.dumps(known))
            elif entry is not None and entry.get("failed"):
                return
            self.end(self._study[1], status)

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
        """The run of a cell's model: the train run, or where this store lacks it, the run `checkpoint_run`
        made in its stead; None when there is neither. Outside a study the cell nests under it."""
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
        named = [call.get("tags", {}).get(k) for k in RUN_TAGS]
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
        self._end_study(status)
        self._close_queue()


# ---------------------------------------------------------------------------------------------------------
# What the evaluate and report stages log


def log_cell(tracker: Tracker, record, images, labels, classes: list[str], params_hash: str) -> str:
    """A cell run named `record.name` (`p_uncond=0.1 w=0.3`, `p_uncond=0.1 w=0.3 rescale_07`), under the study run (outside a study: under its
    model's run); tag model_run_id = its model's run (`Tracker.parent_of`); the record's settings as params
    (options as one JSON dict each), its metrics, fingerprint tags and its sample grid as the image `samples`
    (up to 8 uint8 samples of each class), which the UI's image grid shows side by side across cells."""
    import tempfile

    from cfg.data.images import class_by_w_tiles, save_grid

    model = tracker.parent_of(record.train_run_id)
    tags = (
        {"run_kind": "cell", "fingerprint": record.fingerprint}
        | ({"weights": record.weights_hash} if record.weights_hash else {})
        | ({"model_run_id": model} if model else {})
        | {"guidance": record.guidance, "guidance_label": record.label}
        | ({"mlflow.parentRunId": model} if model and not tracker.study_run() else {})
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
        tracker.log_image(rid, path, "samples")
    tracker.end(rid)
    return rid


def log_report(
    tracker: Tracker, summary: dict, params_hash: str, plots: Path, table: Path, report: Path
) -> str:
    """The report run: the summary's numbers as metrics, the figures, the table and report.md; the numbers go
    to the study run too, where the runs table compares studies."""
    numbers = {k: v for k, v in summary.items() if isinstance(v, float)}
    rid = tracker.start_run("report", params_hash, {"run_kind": "report"})
    tracker.log(rid, metrics=numbers)
    if tracker.study_run():
        tracker.log(tracker.study_run(), metrics=numbers)
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
    ui = sub.add_parser(
        "ui", help="start the MLflow UI (one worker, no job runner) and print links into the latest study"
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of params.yaml)")
    ui.add_argument("--study", help="the study to open on: its run name (the DVC experiment) or key")
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
    from cfg.study.ui import serve

    serve(port=args.port, host=args.host, experiment=args.experiment, study=args.study)


if __name__ == "__main__":
    main()
