"""Workers: join (or create) a study and run trials until it has search.n_trials and none is left running.

Any number of processes on any machines share a study through its storage (SQLite by default, PostgreSQL for
several machines); together they run exactly search.n_trials. Running trials send heartbeats; the trial of a
worker that died is failed after search.grace_period and run again (search.max_retry), and the workers still
alive finish the study.

`worker_slots` plans the worker processes of one machine (`make search-worker GPUS=0,1 WORKERS=N`): each pinned to
one GPU by CUDA_VISIBLE_DEVICES, or N unpinned CPU workers; pipelines/search.py starts them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from cfg.log import get_logger
from cfg.search.objective import Log, Objective, SearchInputs, worker_id
from cfg.search.space import SearchError, SearchSpec, make_pruner, make_sampler
from cfg.search.storage import (
    STUDY_OVERRIDES,
    Budget,
    StudyLock,
    experimental_ok,
    open_storage,
    storage_url,
    study_lock,
)
from cfg.study.config import SearchParams
from cfg.study.store import flatten, masked
from cfg.study.tracking import Tracker


def worker_slots(
    gpus: str | None, workers: int, device: str, cuda_count: int, visible: str | None = None
) -> list[dict[str, str]]:
    """The environment each worker process of this machine gets: `workers` processes per device of `gpus`
    ("0,1": CUDA_VISIBLE_DEVICES=0 and =1, in CUDA's order unless CUDA_DEVICE_ORDER=PCI_BUS_ID; or GPU UUIDs),
    or without `gpus` `workers` processes on `device` (train.device resolved: "cpu" or "cuda") sharing the CPU's
    threads. `cuda_count`: the GPUs this process sees (the range check of numeric indices; -1 skips it).
    `visible`: this process's CUDA_VISIBLE_DEVICES, if set: numeric indices of `gpus` then index that list, as
    torch's device numbers do ("0,1" under CUDA_VISIBLE_DEVICES=2,3: the workers get 2 and 3); UUIDs pass as
    they are."""
    if workers < 1:
        raise SearchError(f"WORKERS = {workers}: give 1 or more worker processes per device")
    if not gpus:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        return [{} if device == "cuda" or workers == 1 else {"OMP_NUM_THREADS": threads}] * workers
    devices = [g.strip() for g in gpus.split(",")]
    if "" in devices or len(set(devices)) < len(devices):
        raise SearchError(f"GPUS = {gpus!r}: give distinct devices separated by commas, e.g. GPUS=0,1")
    if device != "cuda":
        raise SearchError(
            f"GPUS = {gpus!r} but train.device resolves to {device} here (torch sees no CUDA GPU): leave GPUS "
            "out for one worker, or give WORKERS=N for N CPU workers"
        )
    if visible is None:
        beyond = [g for g in devices if g.isdigit() and cuda_count >= 0 and int(g) >= cuda_count]
        if beyond:
            raise SearchError(
                f"GPUS = {gpus!r}: device {beyond[0]} does not exist, this host has {cuda_count} GPUs"
            )
    else:
        parent = [g.strip() for g in visible.split(",")]
        count = len(parent) if cuda_count < 0 else min(cuda_count, len(parent))
        beyond = [g for g in devices if g.isdigit() and int(g) >= count]
        if beyond:
            raise SearchError(
                f"GPUS = {gpus!r}: index {beyond[0]} is outside CUDA_VISIBLE_DEVICES = {visible!r} of this "
                f"command: GPUS takes indices into that list ({', '.join(map(str, range(count)))}) or GPU UUIDs"
            )
        devices = [parent[int(g)] if g.isdigit() else g for g in devices]
        if len(set(devices)) < len(devices):
            raise SearchError(f"GPUS = {gpus!r} gives a GPU of CUDA_VISIBLE_DEVICES = {visible!r} twice")
    return [{"CUDA_VISIBLE_DEVICES": g} for g in devices for _ in range(workers)]


def _print(message: str) -> None:
    get_logger("search").info(message)


def quiet_optuna() -> None:
    """Optuna's records through cfg-lab's one log format (cfg.log) at WARNING: its INFO lines ("Trial 3
    finished with value …") repeat the search's own."""
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _stale_trial_handler(
    tracker: Tracker, max_retry: int, log: Log
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Called for a trial whose worker stopped sending heartbeats: its MLflow run fails, the trial is retried."""
    with experimental_ok():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def handle(study: optuna.Study, trial: FrozenTrial) -> None:
        log(f"trial {trial.number} lost its worker {trial.user_attrs.get('worker')}: failed, retrying")
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:  # best-effort: the run may live in another machine's MLflow store
            tracker.log(run_id, tags={"optuna.state": "FAIL", "failure": "worker lost (no heartbeat)"})
            tracker.end(run_id, "FAILED")
        retry(study, trial)

    return handle


def _join(study: optuna.Study, spec: SearchSpec, inputs: SearchInputs, url: str, tracker: Tracker) -> int:
    """Check this worker against the study (or set the study up); returns how many workers joined before."""
    attrs = study.user_attrs
    mine = {"settings_hash": spec.settings_hash(), "inputs": inputs.fingerprint()}
    if "mlflow_run_id" not in attrs:
        s = spec.search
        # the study's run outlives this worker: every worker's write_results ends it
        run_id = tracker.start_run(
            f"search {s.study_name}",
            mine["settings_hash"],
            {"run_kind": "search", "optuna.study_name": s.study_name, "optuna.storage": masked(url)},
            own=False,
        )
        tracker.log(run_id, params=flatten(spec.params.to_dict()["search"], "search."))
        for key, value in {**mine, "mlflow_run_id": run_id}.items():
            study.set_user_attr(key, value)
    else:
        for key, value in mine.items():
            if attrs.get(key) != value:
                raise SearchError(
                    f"this worker's {key.replace('_', ' ')} {value!r} differs from study {study.study_name!r}'s "
                    f"{attrs.get(key)!r}: its trials would not compare. Use the same params.yaml and the same "
                    "data/classifier/reference files (dvc pull) on every worker, or another search.study_name"
                )
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise SearchError(
            f"study {study.study_name!r} was created with directions {[d.name.lower() for d in study.directions]}, "
            f"search.objective {spec.search.objective!r} needs {spec.directions}; use another search.study_name"
        )
    # the -S overrides of every worker: they agree where they meet (the settings hash), and best_params.yaml
    # needs each one that made params.yaml what the trials ran with
    overrides = {**(attrs.get(STUDY_OVERRIDES) or {}), **spec.pipeline_overrides}
    if overrides != attrs.get(STUDY_OVERRIDES):
        study.set_user_attr(STUDY_OVERRIDES, overrides)
    joined = attrs.get("workers_joined", 0)
    study.set_user_attr("workers_joined", joined + 1)
    return joined


def run_worker(
    spec: SearchSpec,
    inputs: SearchInputs,
    *,
    storage: str | None = None,  # SQLAlchemy URL; overrides search.storage
    log: Log = _print,
) -> optuna.Study:
    """Join (or create) the study and run trials until it has search.n_trials and none is left running.

    Start it on as many machines as you like with the same params.yaml, inputs and storage: they share the
    budget exactly. Returns the study once it is complete.
    """
    s = spec.search
    url = storage_url(storage or s.storage)
    lock = study_lock(url, s.study_name)
    try:
        lock.acquire()  # tables, study, MLflow store and study run are created once, by one worker
        try:
            tracker = Tracker.open("search", spec.params.tracking.experiment)  # the store answers, or exit
            rdb = open_storage(url, s, _stale_trial_handler(tracker, s.max_retry, log))
            study = optuna.create_study(
                storage=rdb, study_name=s.study_name, directions=spec.directions, load_if_exists=True
            )
            if study.metric_names is None:  # the dashboard and trials.csv say "fid", not "Objective 0"
                with experimental_ok():
                    study.set_metric_names(spec.metric_names)
            joined = _join(study, spec, inputs, url, tracker)
        finally:
            lock.release()
        study = optuna.load_study(
            study_name=s.study_name, storage=rdb, sampler=make_sampler(s, joined), pruner=make_pruner(s)
        )
        log(f"worker {worker_id()} joined study {s.study_name!r} on {masked(url)} (worker {joined})")
        _run_trials(study, Objective(spec, inputs, lock, tracker, log), lock, s)
    finally:
        lock.close()
    return study


def _run_trials(study: optuna.Study, objective: Objective, lock: StudyLock, s: SearchParams):
    """Start trials while the budget allows, then wait for the other workers' trials to end (or go stale)."""
    while True:
        lock.acquire()
        try:
            with experimental_ok():  # what optimize() also calls before each trial
                optuna.storages.fail_stale_trials(study)
            budget = Budget.of(study)
            if budget.waiting or budget.used < s.n_trials:
                # a queued retry is popped, else a trial created; the objective releases the lock once it exists
                study.optimize(objective, n_trials=1, catch=(FloatingPointError,))
                continue
        finally:
            lock.release()
        if not budget.running:
            return
        time.sleep(s.heartbeat_interval)
