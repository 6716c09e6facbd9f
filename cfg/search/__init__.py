"""Optuna search over training and sampling settings, at the edge of the library (the only module importing optuna).

A trial applies its values to params.yaml as dotted keys (``train.lr``, ``model.base_width``, ``sample.w``, …),
trains one model with `cfg.engine.training.train_diffusion`, samples with `cfg.engine.generate.generate_w_grid` and scores
with `cfg.eval.metrics` — the calls the train, sample and evaluate stages make — so ``dvc exp run -S key=value``
with the best trial's values reproduces it through the pipeline.

Objectives. ``fid``: the lowest FID, at a searched ``sample.w`` or at the best w of ``search.w``; trials report
intermediate FIDs of ``search.n_samples_cheap`` samples every ``search.eval_every`` training steps and an
Optuna pruner stops the bad ones. ``fid_is``: FID down and IS up, whose answer is the Pareto front; Optuna's
pruners do not apply, so a cheap pass of few samples decides which trials get the full ``sample.n_samples``.

Workers. Any number of processes on any machines share a study through its storage (SQLite by default,
PostgreSQL for several machines). A lock in the storage — a PostgreSQL advisory lock, an flock on the SQLite
file — makes "count the trials, start one" atomic, so together the workers run exactly ``search.n_trials``.
Running trials send heartbeats; the trial of a worker that died is failed after ``search.grace_period`` and run
again (``search.max_retry``), and the workers still alive finish the study.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import socket
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from cfg.data.datasets import ImageDataset, from_uint8
from cfg.engine.generate import generate_w_grid, sampling_kwargs
from cfg.engine.training import train_diffusion, train_kwargs
from cfg.eval.metrics import FeatureExtractor, ReferenceStats, extract_features, fid, inception_score
from cfg.nets.unet import UNetConfig
from cfg.study.config import (
    ModelParams,
    Params,
    ParamsError,
    SampleParams,
    SearchParams,
    TrainParams,
    params_from_dict,
)
from cfg.study.presets import merged_params
from cfg.study.stage import progress_printer
from cfg.study.tracking import client_for, flatten, log_flat, project_root, provenance_tags

# params.yaml sections a trial may change: the data, the evaluation network and the metric settings stay fixed
_SEARCHABLE = {"model": ModelParams, "train": TrainParams, "sample": SampleParams}
# list-valued keys of which a trial uses one value (one model, one guidance strength)
_ONE_VALUE_KEYS = ("train.p_uncond", "sample.w")
# FIDs of different sample counts are not comparable
_FIXED_KEYS = ("sample.n_samples",)
_SPEC_FIELDS = {"low", "high", "log", "step", "choices"}

Log = Callable[[str], None]


class SearchError(ValueError):
    """The search section is inconsistent, or a worker does not fit the study it joins."""


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _experimental_ok() -> Iterator[None]:
    """Heartbeats and their retry callback have been 'experimental' since Optuna 2.8; say so once, here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---------------------------------------------------------------------------------------------------------
# The search space: params.yaml keys and their ranges


@dataclass(frozen=True)
class Dimension:
    """One searched params.yaml key: categorical (choices) or a float / int range (low, high, log, step)."""

    key: str  # dotted params.yaml key, e.g. "train.lr"
    kind: str  # "categorical", "int" or "float"
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample uniformly in log space
    step: float | None = None  # grid spacing; None = continuous (float) or 1 (int)
    choices: tuple = ()

    def suggest(self, trial: Trial) -> Any:
        """The trial's value of this key (a retried trial gets its first attempt's value back)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        value = trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        return float(f"{value:.12g}")  # 0.15000000000000002 -> 0.15, the value params.yaml gets

    def override(self, value: Any) -> Any:
        """The params.yaml value of a suggestion: a one-element list for train.p_uncond and sample.w."""
        return [value] if self.key in _ONE_VALUE_KEYS else value


def _key_type(key: str, where: str) -> type:
    """The scalar type the schema gives `key` (the item type for train.p_uncond / sample.w)."""
    section, _, name = key.partition(".")
    cls = _SEARCHABLE.get(section)
    if cls is None:
        raise SearchError(
            f"{where}: only model.*, train.* and sample.* keys can be searched (data, classifier, evaluate and "
            f"tracking stay fixed so that trials are comparable), got {key!r}"
        )
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise SearchError(f"{where}: {key!r} is not a params.yaml key; {section} keys: {sorted(hints)}")
    if key in _FIXED_KEYS:
        raise SearchError(
            f"{where}: {key} cannot be searched: FIDs of different sample counts do not compare"
        )
    typ = hints[name]
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        (typ,) = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) is list:
        if key not in _ONE_VALUE_KEYS:
            raise SearchError(
                f"{where}: {key} is a list; of the list keys only {' and '.join(_ONE_VALUE_KEYS)} can be searched "
                "(a trial uses one value of them)"
            )
        (typ,) = typing.get_args(typ)
    return typ


def _dimension(key: str, spec: Any, typ: type, where: str) -> Dimension:
    form = "{low, high[, log][, step]} or {choices: [...]}"
    if not isinstance(spec, dict):
        raise SearchError(f"{where} = {spec!r} must be a mapping: {form}")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise SearchError(f"{where}: unknown field {unknown[0]!r}; allowed: {form}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise SearchError(f"{where}: choices cannot be combined with low / high / log / step")
        if not isinstance(choices, list) or not choices:
            raise SearchError(f"{where}.choices = {choices!r} must be a non-empty list")
        if any(isinstance(c, list | dict) for c in choices):
            raise SearchError(f"{where}.choices = {choices!r}: choices must be numbers, strings or booleans")
        return Dimension(key, "categorical", choices=tuple(choices))
    if typ not in (int, float):
        raise SearchError(f"{where}: {key} is a {typ.__name__}; search it with {{choices: [...]}}")
    if "low" not in spec or "high" not in spec:
        raise SearchError(f"{where} = {spec!r} needs low and high (or choices)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = (int,) if typ is int else (int, float)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers)):
            raise SearchError(
                f"{where}.{name} = {value!r} must be {'an integer' if typ is int else 'a number'}"
            )
    if not isinstance(log, bool):
        raise SearchError(f"{where}.log = {log!r} must be true or false")
    if not low < high:
        raise SearchError(f"{where}: low = {low} must be below high = {high}")
    if log and low <= 0:
        raise SearchError(f"{where}: a log range needs low > 0, got low = {low}")
    if step is not None and (step <= 0 or log):
        raise SearchError(f"{where}.step = {step} must be > 0 and cannot be combined with log: true")
    return Dimension(key, typ.__name__, low=low, high=high, log=log, step=step)


def parse_space(space: dict, raw_params: dict) -> list[Dimension]:
    """search.space as dimensions, every bound and choice checked against the params schema."""
    if not space:
        raise SearchError(
            "search.space is empty; give the params.yaml keys to search, e.g. "
            "train.lr: {low: 0.0003, high: 0.01, log: true}"
        )
    dims = []
    for key, spec in space.items():
        where = f"search.space.{key}"
        dim = _dimension(key, spec, _key_type(key, where), where)
        for value in dim.choices or (dim.low, dim.high):
            try:
                params_from_dict(merged_params(raw_params, {key: dim.override(value)}))
            except ParamsError as e:
                raise SearchError(f"{where}: {e}") from None
        dims.append(dim)
    return dims


# ---------------------------------------------------------------------------------------------------------
# A validated search: base params, search section, space


@dataclass(frozen=True)
class SearchSpec:
    """params.yaml (as read, and validated) with its checked search space."""

    raw: dict  # params.yaml as read: each trial applies its values to it
    params: Params  # the validated base parameters
    space: list[Dimension]

    @property
    def search(self) -> SearchParams:
        return self.params.search

    @property
    def multi(self) -> bool:
        """FID and IS (Pareto front) rather than FID alone."""
        return self.search.objective == "fid_is"

    @property
    def directions(self) -> list[str]:
        return ["minimize", "maximize"] if self.multi else ["minimize"]

    def settings_hash(self) -> str:
        """What a trial's result depends on: params.yaml without tracking, device and the workers' own settings."""
        d = self.params.to_dict()
        del d["tracking"], d["train"]["device"]
        for key in (
            "study_name",
            "storage",
            "n_trials",
            "seed",
            "heartbeat_interval",
            "grace_period",
            "max_retry",
        ):
            del d["search"][key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def make_sampler(s: SearchParams, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """search.sampler with search.sampler_options, seeded by search.seed + seed_offset."""
    cls = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "nsgaii": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
    }[s.sampler]
    try:
        return cls(seed=None if s.seed is None else s.seed + seed_offset, **s.sampler_options)
    except (TypeError, ValueError) as e:
        raise SearchError(
            f"search.sampler_options = {s.sampler_options} do not fit {cls.__name__}: {e}"
        ) from None


def make_pruner(s: SearchParams) -> optuna.pruners.BasePruner:
    """search.pruner with search.pruner_options."""
    cls = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }[s.pruner]
    try:
        return cls(**s.pruner_options)
    except (TypeError, ValueError) as e:
        raise SearchError(
            f"search.pruner_options = {s.pruner_options} do not fit {cls.__name__}: {e}"
        ) from None


def check_search(raw: dict) -> SearchSpec:
    """Validate params.yaml and its search section before anything is trained; raises ParamsError / SearchError."""
    params = params_from_dict(raw)
    s = params.search
    space = parse_space(s.space, raw)
    keys = {d.key for d in space}
    if "train.p_uncond" not in keys and len(params.train.p_uncond) != 1:
        raise SearchError(
            f"train.p_uncond = {params.train.p_uncond}: a trial trains one model; put train.p_uncond in "
            "search.space or give it one value"
        )
    if s.objective == "fid_is" and "sample.w" not in keys and len(s.w) != 1:
        raise SearchError(
            f"search.w = {s.w}: objective fid_is scores one (FID, IS) point per trial; put sample.w in "
            "search.space or give search.w one value"
        )
    if s.grace_period <= s.heartbeat_interval:
        raise SearchError(
            f"search.grace_period = {s.grace_period} must exceed search.heartbeat_interval = "
            f"{s.heartbeat_interval}, or live trials would be failed"
        )
    if s.n_samples_cheap > params.sample.n_samples:
        raise SearchError(
            f"search.n_samples_cheap = {s.n_samples_cheap} must not exceed sample.n_samples = "
            f"{params.sample.n_samples} (the full count)"
        )
    make_sampler(s)
    make_pruner(s)
    return SearchSpec(raw=raw, params=params, space=space)


def trial_params(spec: SearchSpec, overrides: dict[str, Any]) -> Params:
    """The parameters a trial runs with: params.yaml with the trial's values applied."""
    return params_from_dict(merged_params(spec.raw, overrides))


# ---------------------------------------------------------------------------------------------------------
# Storage, the workers' lock and the trial budget


def storage_url(configured: str | None = None, root: str | Path | None = None) -> str:
    """search.storage, else sqlite:///<project root>/optuna.db (absolute: DVC's experiment copies share it).

    A plain postgresql:// URL gets the PostgreSQL driver that is installed: SQLAlchemy 2.1 assumes psycopg 3,
    the `postgres` extra installs psycopg2.
    """
    if not configured:
        return f"sqlite:///{(Path(root) if root else project_root()) / 'optuna.db'}"
    if configured.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + configured.removeprefix("postgresql://")
    return configured


def masked(url: str) -> str:
    """The storage URL with its password hidden, for logs and tags."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


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
    """A PostgreSQL session advisory lock keyed by the study name; the server drops it when a worker dies."""

    def __init__(self, url: str, study_name: str):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        self._text = sqlalchemy.text
        self.held = False

    def acquire(self) -> None:
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self.held = True

    def release(self) -> None:
        if self.held:
            self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self.held = False

    def close(self) -> None:
        self.release()
        self._conn.close()


def study_lock(url: str, study_name: str) -> _FileLock | _AdvisoryLock:
    """The lock that serialises 'count the trials, start one' among all workers of a study."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        return _AdvisoryLock(url, study_name)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
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


def open_storage(
    url: str, s: SearchParams, on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None
) -> optuna.storages.RDBStorage:
    """The study's storage with heartbeats: a trial silent for search.grace_period seconds is failed."""
    sqlite = url.startswith("sqlite")
    with _experimental_ok():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True},
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )


# ---------------------------------------------------------------------------------------------------------
# Inputs and scores of a trial


@dataclass
class SearchInputs:
    """What every trial reads: the prepared data, the evaluation network and the reference statistics."""

    data: ImageDataset
    extractor: FeatureExtractor
    reference: ReferenceStats
    device: torch.device

    def fingerprint(self) -> str:
        """Identity of the inputs: every worker of a study must score against the same ones."""
        return f"data {self.data.fingerprint()[:16]} reference {self.reference.hash}"


def score_w_grid(
    model: torch.nn.Module,
    p: Params,
    w_values: list[float],  # guidance strengths, the paper's w
    n_samples: int,  # images per w
    inputs: SearchInputs,
) -> list[tuple[float, float]]:
    """(FID, IS) per w: samples drawn as the sample stage draws them, scored as the evaluate stage scores them."""
    cfg = model.config
    images, _ = generate_w_grid(
        model,
        w_values,
        n_samples,
        num_classes=cfg.num_classes,
        image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        device=inputs.device,
        **sampling_kwargs(p),
    )  # (W, N, C, H, W) uint8
    scores = []
    for j in range(len(w_values)):
        gen = extract_features(
            inputs.extractor, from_uint8(images[j]), batch_size=p.evaluate.batch_size, device=inputs.device
        )
        scores.append((fid(gen, inputs.reference), inception_score(gen)[0]))
    return scores


def _dominated(point: tuple[float, float], others: list[tuple[float, float, int]]) -> int | None:
    """The number of a trial whose (FID, IS) is at least as good in both and better in one, else None."""
    f, i = point
    for of, oi, number in others:
        if of <= f and oi >= i and (of < f or oi > i):
            return number
    return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------
# The objective


class _Objective:
    """One trial: train with the trial's parameters, score, report to Optuna and to MLflow."""

    def __init__(self, spec: SearchSpec, inputs: SearchInputs, lock, client, exp_id: str, log: Log):
        self.spec, self.inputs, self.lock, self.log = spec, inputs, lock, log
        self.client, self.exp_id = client, exp_id

    def __call__(self, trial: Trial) -> float | tuple[float, float]:
        self.lock.release()  # the trial exists and counts: other workers may start theirs
        overrides = {d.key: d.override(d.suggest(trial)) for d in self.spec.space}
        p = trial_params(self.spec, overrides)
        w_values = p.sample.w if "sample.w" in overrides else p.search.w
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("w_grid", w_values)
        trial.set_user_attr("worker", worker_id())
        run_id = self._start_run(trial, overrides, w_values)
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            values = self._train_and_score(trial, p, w_values, run_id)
        except optuna.TrialPruned as e:
            self._end_run(run_id, "PRUNED", "KILLED")
            self.log(f"[search] trial {trial.number} pruned: {e}")
            raise
        except BaseException:
            self._end_run(run_id, "FAIL", "FAILED")
            raise
        self._end_run(run_id, "COMPLETE", "FINISHED")
        return values

    def _start_run(self, trial: Trial, overrides: dict, w_values: list[float]) -> str:
        s = self.spec.search
        study_run = trial.study.user_attrs["mlflow_run_id"]
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried = retry_of(frozen)
        tags = {
            "run_kind": "trial",
            "mlflow.parentRunId": study_run,
            "optuna.study_name": s.study_name,
            "optuna.trial_number": trial.number,
            "worker": worker_id(),
            **({"optuna.retry_of": retried} if retried is not None else {}),
        }
        run = self.client.create_run(
            self.exp_id,
            run_name=f"trial {trial.number}",
            tags=provenance_tags("search", self.spec.settings_hash(), tags),
        )
        log_flat(
            self.client,
            run.info.run_id,
            params={
                **flatten(overrides),
                "w_grid": w_values,
                "n_samples": self.spec.params.sample.n_samples,
                "n_samples_cheap": s.n_samples_cheap,
            },
        )
        return run.info.run_id

    def _end_run(self, run_id: str, state: str, status: str) -> None:
        log_flat(self.client, run_id, tags={"optuna.state": state})
        self.client.set_terminated(run_id, status=status)

    def _train_and_score(
        self, trial: Trial, p: Params, w_values: list[float], run_id: str
    ) -> float | tuple[float, float]:
        s, t, inputs = p.search, p.train, self.inputs
        t0 = time.perf_counter()
        show = progress_printer(f"search trial {trial.number}", "steps", every_s=30)

        def at_log(entry: dict) -> None:
            step = entry["step"]
            show({"done": step, "total": t.steps, "loss": entry["loss"], "eta_s": entry["eta_s"]})
            log_flat(self.client, run_id, metrics={"loss": entry["loss"]}, step=step)
            if self.spec.multi or step % s.eval_every or step == t.steps:
                return
            # Intermediate FID of a few samples at a checkpoint: what the pruner judges
            cheap = min(f for f, _ in score_w_grid(entry["ema"], p, w_values, s.n_samples_cheap, inputs))
            trial.report(cheap, step)
            log_flat(self.client, run_id, metrics={"fid_cheap": cheap}, step=step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"FID {cheap:.4g} of {s.n_samples_cheap} samples per w at step {step}"
                )

        result = train_diffusion(
            UNetConfig.from_params(
                p.model,
                image_size=inputs.data.image_size,
                in_channels=inputs.data.channels,
                num_classes=inputs.data.num_classes,
            ),
            inputs.data.train_x,
            inputs.data.train_y,
            p_uncond=t.p_uncond[0],
            device=inputs.device,
            **train_kwargs(t),
            log_every=math.gcd(t.log_every, s.eval_every),  # only how often the callback runs
            callback=at_log,
        )
        log_flat(
            self.client,
            run_id,
            metrics={"final_loss": result.history[-1]["loss"], "train_images_per_s": result.images_per_s},
        )
        if self.spec.multi:
            self._promote(trial, p, w_values, result.ema, run_id)
        scores = score_w_grid(result.ema, p, w_values, p.sample.n_samples, inputs)
        best = min(range(len(w_values)), key=lambda j: scores[j][0])
        fid_best, is_best = scores[best]
        trial.set_user_attr("w", w_values[best])
        log_flat(
            self.client,
            run_id,
            metrics={
                "fid": fid_best,
                "is": is_best,
                "w": w_values[best],
                "seconds": time.perf_counter() - t0,
                **{f"fid_w{w:g}": f for w, (f, _) in zip(w_values, scores, strict=True)},
                **{f"is_w{w:g}": i for w, (_, i) in zip(w_values, scores, strict=True)},
            },
        )
        self.log(
            f"[search] trial {trial.number}: FID {fid_best:.4g}, IS {is_best:.4g} at w={w_values[best]:g} "
            f"({time.perf_counter() - t0:.0f}s) {trial.user_attrs['overrides']}"
        )
        return (fid_best, is_best) if self.spec.multi else fid_best

    def _promote(self, trial: Trial, p: Params, w_values: list[float], model, run_id: str) -> None:
        """fid_is: a cheap pass first; the full count only for trials search.promote lets through."""
        s = p.search
        ((f, i),) = score_w_grid(model, p, w_values, s.n_samples_cheap, self.inputs)
        trial.set_user_attr("cheap", [f, i])
        log_flat(self.client, run_id, metrics={"fid_cheap": f, "is_cheap": i})
        if s.promote == "all":
            return
        done = [
            (*t.user_attrs["cheap"], t.number)
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "cheap" in t.user_attrs
        ]
        better = _dominated((f, i), done)
        if better is not None:
            raise optuna.TrialPruned(
                f"cheap pass (FID {f:.4g}, IS {i:.4g} of {s.n_samples_cheap} samples) dominated by trial {better}'s"
            )


# ---------------------------------------------------------------------------------------------------------
# Workers


def _stale_trial_handler(client, max_retry: int, log: Log) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Called for a trial whose worker stopped sending heartbeats: its MLflow run fails, the trial is retried."""
    with _experimental_ok():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def handle(study: optuna.Study, trial: FrozenTrial) -> None:
        log(
            f"[search] trial {trial.number} lost its worker {trial.user_attrs.get('worker')}: failed, retrying"
        )
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                log_flat(
                    client, run_id, tags={"optuna.state": "FAIL", "failure": "worker lost (no heartbeat)"}
                )
                client.set_terminated(run_id, status="FAILED")
            except Exception as e:  # the run lives in another machine's MLflow store
                log(f"[search] could not mark MLflow run {run_id} failed: {e}")
        retry(study, trial)

    return handle


def _join(study: optuna.Study, spec: SearchSpec, inputs: SearchInputs, url: str, client, exp_id: str) -> int:
    """Check this worker against the study (or set the study up); returns how many workers joined before."""
    attrs = study.user_attrs
    mine = {"settings_hash": spec.settings_hash(), "inputs": inputs.fingerprint()}
    if "mlflow_run_id" not in attrs:
        s = spec.search
        run = client.create_run(
            exp_id,
            run_name=f"search {s.study_name}",
            tags=provenance_tags(
                "search",
                mine["settings_hash"],
                {"run_kind": "search", "optuna.study_name": s.study_name, "optuna.storage": masked(url)},
            ),
        )
        log_flat(client, run.info.run_id, params=flatten(spec.params.to_dict()["search"], "search."))
        for key, value in {**mine, "mlflow_run_id": run.info.run_id}.items():
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
            client, exp_id = client_for(spec.params.tracking.uri, spec.params.tracking.experiment)
            rdb = open_storage(url, s, _stale_trial_handler(client, s.max_retry, log))
            study = optuna.create_study(
                storage=rdb, study_name=s.study_name, directions=spec.directions, load_if_exists=True
            )
            joined = _join(study, spec, inputs, url, client, exp_id)
        finally:
            lock.release()
        study = optuna.load_study(
            study_name=s.study_name, storage=rdb, sampler=make_sampler(s, joined), pruner=make_pruner(s)
        )
        log(f"[search] worker {worker_id()} joined study {s.study_name!r} on {masked(url)} (worker {joined})")
        _run_trials(study, _Objective(spec, inputs, lock, client, exp_id, log), lock, s)
    finally:
        lock.close()
    return study


def _run_trials(study: optuna.Study, objective: _Objective, lock: _FileLock | _AdvisoryLock, s: SearchParams):
    """Start trials while the budget allows, then wait for the other workers' trials to end (or go stale)."""
    while True:
        lock.acquire()
        try:
            with _experimental_ok():  # what optimize() also calls before each trial
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


# ---------------------------------------------------------------------------------------------------------
# Results


def trial_overrides(trial: FrozenTrial) -> dict[str, Any]:
    """The params.yaml overrides that reproduce a trial, sample.w being the w values it was scored at.

    The whole grid, not only its best w: the sample stage then draws the very batches and noise the trial drew
    (generate_w_grid batches by the number of w), so the pipeline's cell at the best w has the trial's FID.
    """
    return {**trial.user_attrs["overrides"], "sample.w": trial.user_attrs["w_grid"]}


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (fid) or the Pareto front sorted by FID (fid_is); empty before any trial completes."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def summary(study: optuna.Study) -> dict:
    """Trial counts by state and the best trial or the Pareto front, each with the overrides reproducing it."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    names = ["fid"] if len(study.directions) == 1 else ["fid", "is"]
    best = [
        {
            "number": t.number,
            **dict(zip(names, t.values, strict=True)),
            "w": t.user_attrs["w"],
            "overrides": trial_overrides(t),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
        }
        for t in best_trials(study)
    ]
    return {
        "study_name": study.study_name,
        "objective": "fid" if len(names) == 1 else "fid_is",
        "trials": len(trials),
        "states": counts,
        "retried": sum(retry_of(t) is not None for t in trials),
        "best" if len(names) == 1 else "pareto_front": best,
        "mlflow_run_id": study.user_attrs.get("mlflow_run_id"),
    }


def best_params_yaml(study: optuna.Study, trial: FrozenTrial) -> str:
    """A params file of dotted overrides reproducing `trial` through the pipeline (cfg.study.presets applies it)."""
    values = ", ".join(f"{n} {v:.4g}" for n, v in zip(("FID", "IS"), trial.values, strict=False))
    header = (
        f"# Trial {trial.number} of Optuna study {study.study_name!r}: {values} at w = {trial.user_attrs['w']:g}.\n"
        "# Reproduce it through the pipeline:  python pipelines/search.py apply <this file> --run\n"
        "#                             (runs:  dvc exp run -S key=value ...)\n"
    )
    return header + yaml.safe_dump(trial_overrides(trial), sort_keys=False, default_flow_style=None)
