"""The search space and the validated search section, checked before anything is trained.

`parse_space` turns search.space into `Dimension`s, each a params.yaml key with its range or choices, checked
against the params schema; `check_search` validates the whole params file (with the command line's `-S`
overrides) into a `SearchSpec`, `read_search` a params file and the command line's arguments; `trial_params`
applies a trial's values to it.

A trial scores one guidance method. With several entries in sample.guidance, the trial picks one: the categorical
dimension `sample.guidance` over their labels (added to the space, or given there as `{choices: [labels]}` to search
a subset), and only that entry's options (`sample.guidance.<label>.<option>`) are suggested: a conditional space,
as Optuna's define-by-run trials allow, so each method's options are learnt from the trials that scored it.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfg.io import load_yaml
from cfg.search.registry import PRUNERS, SAMPLERS
from cfg.study.config import (
    ModelParams,
    Params,
    ParamsError,
    SampleParams,
    SearchParams,
    TrainParams,
    params_from_dict,
)
from cfg.study.presets import merged_params, parse_set

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.trial import Trial

# params.yaml sections a trial may change: the data, the evaluation network and the metric settings stay fixed
_SEARCHABLE = {"model": ModelParams, "train": TrainParams, "sample": SampleParams}
# list-valued keys of which a trial uses one value (one model, one guidance strength)
_ONE_VALUE_KEYS = ("train.p_uncond", "sample.w")
# FIDs of different sample counts are not comparable
_FIXED_KEYS = ("sample.n_samples",)
_SPEC_FIELDS = {"low", "high", "log", "step", "choices"}
# the categorical dimension over sample.guidance's labels: the entry a trial scores
GUIDANCE_KEY = "sample.guidance"
# keys no pipeline stage's result depends on (nor the settings hash): a study's -S overrides of them are not
# part of reproducing its trials, and its workers may differ in them
_NOT_REPRODUCED = ("search.", "tracking.")  # sections
_NOT_REPRODUCED_KEYS = frozenset({"train.device"})  # keys (train.devices is reproduced: it sums gradients)


class SearchError(ValueError):
    """The search section is inconsistent, or a worker does not fit the study it joins."""


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

    @property
    def entry(self) -> str | None:
        """The sample.guidance label whose option this is (sample.guidance.<label>.<option>), else None."""
        parts = self.key.split(".")
        return parts[2] if len(parts) == 4 and self.key.startswith(GUIDANCE_KEY + ".") else None


def _entries(raw_params: dict) -> dict:
    """params.yaml's sample.guidance as read: label -> its options ({} for null), the default {cfg: {}}."""
    entries = (raw_params.get("sample") or {}).get("guidance") or {"cfg": {}}
    return {label: options or {} for label, options in entries.items()} if isinstance(entries, dict) else {}


def _method(raw_params: dict, label: str) -> str:
    """The guidance method of a sample.guidance entry: its `method` option, else its label."""
    return _entries(raw_params)[label].get("method", label)


def _guidance_option_type(key: str, raw_params: dict, where: str) -> type:
    """The type of `sample.guidance.<label>.<option>`: its default's in the method's registry entry."""
    from cfg.maths.guidance import GUIDANCE

    parts = key.split(".")
    entries = _entries(raw_params)
    if len(parts) != 4 or parts[2] not in entries:
        raise SearchError(
            f"{where}: guidance options are searched as sample.guidance.<label>.<option> with <label> an entry "
            f"of sample.guidance ({sorted(entries)}), got {key!r}"
        )
    label, option = parts[2], parts[3]
    method = _method(raw_params, label)
    options = GUIDANCE.options(method) if method in GUIDANCE else {}
    if option not in options:
        raise SearchError(
            f"{where}: {option!r} is not an option of guidance method {method!r}; its options: {sorted(options)}"
        )
    return type(options[option])


def _key_type(key: str, where: str, raw_params: dict | None = None) -> type:
    """The scalar type the schema gives `key` (the item type for train.p_uncond / sample.w; a guidance option's
    default's type for sample.guidance.<label>.<option>)."""
    if key.startswith("sample.guidance."):
        return _guidance_option_type(key, raw_params or {}, where)
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
        kinds = [a for a in typing.get_args(typ) if a is not type(None)]
        # a count or a word (train.devices: 4 | all), off/on or a word (sample.compile: true | max-autotune): choices
        typ = kinds[0] if len(kinds) == 1 else str
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
    if typ is float:  # suggest_float's values are floats: the bounds are checked as such (0 as 0.0)
        low, high, step = float(low), float(high), None if step is None else float(step)
    return Dimension(key, typ.__name__, low=low, high=high, log=log, step=step)


def _guidance_dimension(spec: Any, raw_params: dict, where: str) -> Dimension:
    """`sample.guidance: {choices: [labels]}`: the sample.guidance entries a trial may score."""
    labels = sorted(_entries(raw_params))
    if not isinstance(spec, dict) or set(spec) != {"choices"} or not isinstance(spec["choices"], list):
        raise SearchError(
            f"{where} = {spec!r}: the guidance entry a trial scores is searched as {{choices: [labels]}} with "
            f"labels of sample.guidance ({labels})"
        )
    choices = spec["choices"]
    unknown = [c for c in choices if c not in labels]
    if not choices or unknown:
        raise SearchError(
            f"{where}.choices = {choices!r}: {unknown[0]!r} is not an entry of sample.guidance; its labels: {labels}"
            if unknown
            else f"{where}.choices is empty; give labels of sample.guidance ({labels})"
        )
    return Dimension(GUIDANCE_KEY, "categorical", choices=tuple(dict.fromkeys(choices)))


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
        if key == GUIDANCE_KEY:
            dim = _guidance_dimension(spec, raw_params, where)
        else:
            dim = _dimension(key, spec, _key_type(key, where, raw_params), where)
        for value in dim.choices or (dim.low, dim.high):
            overrides = {key: dim.override(value)} | ({GUIDANCE_KEY: dim.entry} if dim.entry else {})
            try:
                params_from_dict(_merged(raw_params, overrides))
            except ParamsError as e:
                raise SearchError(f"{where}: {e}") from None
        dims.append(dim)
    return dims


def _merged(raw_params: dict, overrides: dict[str, Any]) -> dict:
    """params.yaml as a dict with a trial's overrides applied; a label at sample.guidance (GUIDANCE_KEY) keeps
    that entry alone, with its option overrides."""
    label = overrides.get(GUIDANCE_KEY)
    base = json.loads(json.dumps(raw_params))
    base.setdefault("sample", {})["guidance"] = _entries(raw_params)
    merged = merged_params(base, {k: v for k, v in overrides.items() if k != GUIDANCE_KEY})
    if label is not None:
        merged["sample"]["guidance"] = {label: merged["sample"]["guidance"][label]}
    return merged


# ---------------------------------------------------------------------------------------------------------
# A validated search: base params, search section, space


@dataclass(frozen=True)
class SearchSpec:
    """params.yaml (as read, with the command line's overrides, and validated) with its checked search space."""

    raw: dict  # params.yaml as read with the -S overrides applied: each trial applies its values to it
    params: Params  # the validated base parameters
    space: list[Dimension]
    overrides: dict[str, Any] = field(default_factory=dict)  # the command line's -S / --n-trials, dotted keys

    @property
    def pipeline_overrides(self) -> dict[str, Any]:
        """The -S overrides a trial's model and scores depend on: what `dvc exp run` needs besides the trial's
        own values to reproduce it (search.*, tracking.* and train.device left out: no stage's result, nor the
        settings hash, depends on them)."""
        return {
            k: v
            for k, v in self.overrides.items()
            if not k.startswith(_NOT_REPRODUCED) and k not in _NOT_REPRODUCED_KEYS
        }

    @property
    def search(self) -> SearchParams:
        return self.params.search

    def suggest(self, trial: Trial) -> dict[str, Any]:
        """A trial's overrides, {params.yaml key: value}: the guidance entry it scores first (GUIDANCE_KEY, where
        the space has it), then every other dimension but the options of the entries it does not score."""
        label = next((d.suggest(trial) for d in self.space if d.key == GUIDANCE_KEY), None)
        overrides = {} if label is None else {GUIDANCE_KEY: label}
        for d in self.space:
            if d.key != GUIDANCE_KEY and (label is None or d.entry in (None, label)):
                overrides[d.key] = d.override(d.suggest(trial))
        return overrides

    @property
    def multi(self) -> bool:
        """FID and IS (Pareto front) rather than FID alone."""
        return self.search.objective == "fid_is"

    @property
    def directions(self) -> list[str]:
        return ["minimize", "maximize"] if self.multi else ["minimize"]

    @property
    def metric_names(self) -> list[str]:
        """The objectives' names, one per direction (Optuna's study.metric_names, shown by the dashboard)."""
        return ["fid", "is"] if self.multi else ["fid"]

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


def make_sampler(s: SearchParams, seed_offset: int = 0) -> BaseSampler:
    """search.sampler with search.sampler_options, seeded by search.seed + seed_offset."""
    seed = None if s.seed is None else s.seed + seed_offset
    try:
        return SAMPLERS[s.sampler](s.sampler_options, seed)
    except (TypeError, ValueError) as e:
        raise SearchError(
            f"search.sampler_options = {s.sampler_options} do not fit search.sampler {s.sampler!r}: {e}"
        ) from None


def make_pruner(s: SearchParams) -> BasePruner:
    """search.pruner with search.pruner_options."""
    try:
        return PRUNERS[s.pruner](s.pruner_options)
    except (TypeError, ValueError) as e:
        raise SearchError(
            f"search.pruner_options = {s.pruner_options} do not fit search.pruner {s.pruner!r}: {e}"
        ) from None


def check_search(raw: dict, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """Validate params.yaml with dotted `overrides` (the command line's -S) applied, and its search section,
    before anything is trained; raises ParamsError / SearchError."""
    overrides = dict(overrides or {})
    raw = merged_params(raw, overrides) if overrides else raw
    params = params_from_dict(raw)
    s = params.search
    space = parse_space(s.space, raw)
    keys = {d.key for d in space}
    if "train.p_uncond" not in keys and len(params.train.p_uncond) != 1:
        raise SearchError(
            f"train.p_uncond = {params.train.p_uncond}: a trial trains one model; put train.p_uncond in "
            "search.space or give it one value"
        )
    labels = list(_entries(raw))
    if GUIDANCE_KEY not in keys and len(labels) > 1:  # the trial picks the entry it scores
        space = [Dimension(GUIDANCE_KEY, "categorical", choices=tuple(labels)), *space]
    scored = next((list(d.choices) for d in space if d.key == GUIDANCE_KEY), labels)
    guided = [label for label in scored if _method(raw, label) == "autoguidance"]
    if guided:
        others = [label for label in scored if label not in guided]
        raise SearchError(
            f"sample.guidance.{guided[0]} is autoguidance, which needs a guide network that a trial does not train; "
            + (
                f"score the other entries: search.space.{GUIDANCE_KEY}: {{choices: {others}}}"
                if others
                else "give sample.guidance an entry without one"
            )
        )
    for d in space:
        if d.entry is not None and d.entry not in scored:
            raise SearchError(
                f"search.space.{d.key}: entry {d.entry!r} is not among those a trial scores "
                f"(search.space.{GUIDANCE_KEY}.choices = {scored}): its option would never be used"
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
    return SearchSpec(raw=raw, params=params, space=space, overrides=overrides)


def read_search(path: str | Path, sets: list[str] | None = None, n_trials: int | None = None) -> SearchSpec:
    """The validated search of a params file with the command line's `-S key=value` items and --n-trials:
    what `pipelines/search.py` runs with, and what `cfg-lab search` checks before it builds the inputs.
    Raises SearchError, naming the file."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise SearchError(f"parameter file {str(path)!r} not found") from None
    try:
        overrides = parse_set(sets or [])
        if n_trials is not None:
            overrides["search.n_trials"] = n_trials
        return check_search(raw, overrides)
    except (ParamsError, SearchError) as e:
        raise SearchError(f"{path.name}: {e}") from None


def trial_params(spec: SearchSpec, overrides: dict[str, Any]) -> Params:
    """The parameters a trial runs with: params.yaml with the trial's values applied (`SearchSpec.suggest`;
    sample.guidance: the lone entry it scores)."""
    return params_from_dict(_merged(spec.raw, overrides))
