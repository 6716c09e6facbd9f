"""The typed schema of params.yaml: the one place that knows every key, its type, default and allowed range.

`load_params` reads the YAML file, rejects unknown keys, checks every value and returns a `Params`
tree of dataclasses. Errors name the key, the offending value and what is allowed, e.g.
``params.yaml: train.p_uncond[1] = 1.5 is out of range: allowed 0 <= value <= 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfg.data.datasets import DATASETS
from cfg.engine.device import COMPILE_MODES
from cfg.eval.features import EXTRACTORS
from cfg.eval.metrics import METRICS
from cfg.io import load_yaml
from cfg.maths import samplers as diffusion
from cfg.maths.guidance import guidance_entries, needs_guide_network
from cfg.search.registry import PRUNERS, SAMPLERS

DEVICE_NAMES = ("auto", "cpu", "cuda")

# |λ| up to which float32 holds the VP process (cfg.maths.diffusion.alpha_sigma): σ² = sigmoid(−λ) (α² at −λ)
# falls below float32's smallest normal number, 2^−126, at λ = 126 ln 2 = 87.336, and torch's sigmoid returns
# exactly 0 from λ ≈ 88.7 on: σ = 0 at λ_max (or α = 0 at λ_min) divides by zero in the samplers' x̂ and ε
LAMBDA_LIMIT = math.floor(126 * math.log(2) * 100) / 100  # 87.33


class ParamsError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


class ParamsWarning(UserWarning):
    """A parameter is allowed but probably not meant (e.g. train.ema_decay = 0, which averages nothing)."""


def _p(default: Any, help: str, **rules: Any) -> Any:
    """A schema field: default, one-line help, and rules (ge, gt, le, lt, choices, nonempty; `why`: the reason
    for a range, added to its out-of-range message; `decimal`: why a number must be written with a decimal point)."""
    if isinstance(default, list | tuple):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class DataParams:
    name: str = _p("digits", "data set", choices=tuple(DATASETS))
    root: str | None = _p(None, "local directory of the data (fashion_mnist, cifar10, image_folder)")
    image_size: int | None = _p(
        None,
        "resize to this many pixels a side; null = the data set's own (digits 16, 32x32 else, folders native)",
        ge=4,
    )
    download: bool = _p(False, "allow torchvision to download a data set that is not under root")
    max_train: int | None = _p(None, "use only the first N training images (tests, quick runs)", ge=1)
    max_test: int | None = _p(None, "use only the first N test images", ge=1)


@dataclass
class ClassifierParams:
    width: int = _p(32, "base channels of the evaluation classifier", ge=4)
    feature_dim: int = _p(128, "penultimate feature size used by FID / KID / precision-recall", ge=2)
    epochs: int = _p(15, "training epochs", ge=1)
    batch_size: int = _p(128, "images per step", ge=1)
    lr: float = _p(1e-3, "Adam learning rate", gt=0)
    seed: int = _p(0, "seed of initialisation and data order")


@dataclass
class ModelParams:
    base_width: int = _p(32, "U-Net channels at the first level", ge=8)
    channel_mult: list[int] = _p([1, 2], "width multiplier per U-Net level", nonempty=True, ge=1)
    blocks_per_level: int = _p(1, "residual blocks per level", ge=1)
    attention_resolutions: list[int] = _p([8], "feature-map sizes with self-attention", ge=1)
    dropout: float = _p(0.1, "dropout in residual blocks", ge=0, lt=1)
    head_channels: int = _p(32, "channels per attention head", ge=1)


_LAMBDA_WHY = (
    f"beyond |λ| = {LAMBDA_LIMIT} sigmoid(−|λ|) underflows float32's normal range (and is 0 from 88.7 on): "
    "σ at λ_max or α at λ_min of cfg.maths.diffusion.alpha_sigma becomes 0"
)


@dataclass
class TrainParams:
    p_uncond: list[float] = _p(
        [0.1, 0.2, 0.5],
        "label-dropout probabilities: one model each",
        nonempty=True,
        unique=True,
        ge=0,
        le=1,
        decimal="DVC names each model's stages and folders from the value as written (train@0, "
        "models/p_uncond=0) and the stages find them from the number (p_uncond=0.0)",
    )
    steps: int = _p(3000, "optimiser steps", ge=1)
    batch_size: int = _p(128, "images per step", ge=1)
    lr: float = _p(2e-3, "Adam learning rate", gt=0)
    warmup_steps: int = _p(100, "linear learning-rate warm-up steps", ge=0)
    ema_decay: float = _p(0.999, "EMA decay of the sampled weights", ge=0, lt=1)
    ema_warmup: bool = _p(
        True,
        "EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t, so short runs do not average in the init",
    )
    grad_clip: float | None = _p(1.0, "clip the gradient norm to this; null disables", gt=0)
    lambda_min: float = _p(
        -20.0, "log-SNR at the noisy end (paper: -20)", ge=-LAMBDA_LIMIT, le=LAMBDA_LIMIT, why=_LAMBDA_WHY
    )
    lambda_max: float = _p(
        20.0, "log-SNR at the clean end (paper: 20)", ge=-LAMBDA_LIMIT, le=LAMBDA_LIMIT, why=_LAMBDA_WHY
    )
    seed: int = _p(0, "seed of initialisation, data order, λ and label dropout")
    log_every: int = _p(50, "steps between logged loss values", ge=1)
    device: str = _p("auto", "auto (CUDA when present), cpu or cuda", choices=DEVICE_NAMES)
    bf16: bool = _p(True, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool | str = _p(
        False,
        "torch.compile the model on CUDA: true, false or a variant of cfg.engine.device.COMPILE_MODES (default, "
        "coordinate-descent, max-autotune: faster kernels for a longer first compile; regional: the repeated "
        "blocks one by one: a shorter first compile on CPU, but on an H200 no shorter and a slower step; README)",
        choices=tuple(COMPILE_MODES),
    )
    cuda_graph: bool = _p(
        False,
        "on CUDA with one process: replay each training step as one CUDA graph (the step is launch-bound at "
        "small models and batches); weights equal the eager step's up to rounding",
    )
    compile_update: bool = _p(
        False,
        "with compile and cuda_graph: gradient clipping, Adam and the EMA compiled as well (fused kernels over all "
        "parameters); on an H200 the preset's step ran 0.41 ms faster (of 15.4) for ~70 s more first compile from "
        "an empty cache; README",
    )
    devices: int | str = _p(
        1,
        "processes (one per GPU) of the train stage: N, or all (every visible GPU; one process on CPU); "
        "batch_size is the global batch",
        ge=1,
        choices=("all",),
    )
    checkpoint_every: int = _p(
        500, "steps between resume states of the train stage (under .resume/); 0 disables", ge=0
    )
    eval_every: int = _p(
        0,
        "steps between FIDs of the EMA weights during training (MLflow curve, eval.csv), and at the last step; "
        "a multiple of log_every; 0 disables",
        ge=0,
    )
    eval_samples: int = _p(200, "samples per w of those FIDs", ge=2)
    eval_w: float = _p(0.3, "the guided w scored besides w = 0", gt=0)


@dataclass
class GuideParams:
    """Autoguidance's guide network (Karras et al. 2024): a weaker version of the model, trained by the train_guide
    stage only when an entry of sample.guidance needs one (cfg.maths.guidance.Traits.guide); it is trained with
    the models' train.* settings but for these."""

    model: dict = field(
        default_factory=dict,
        metadata={
            "help": "keys of the model section that differ for the guide, e.g. {base_width: 8} (EDM2: a smaller "
            "network); the rest is the model's"
        },
    )
    steps: int = _p(200, "optimiser steps of the guide (EDM2: trained shorter than the model)", ge=1)
    p_uncond: float = _p(
        0.0,
        "label dropout of the guide: autoguidance calls it with the labels only, so 0 spends all of its training on "
        "ε(z, c); 1 would train no conditional branch",
        ge=0,
        lt=1,
    )


@dataclass
class SampleParams:
    w: list[float] = _p(
        [-1.0, 0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 4.0],
        "guidance strengths (paper's w; -1 = unconditional)",
        nonempty=True,
        unique=True,
        ge=-1,
    )
    sampler: str = _p("ancestral", "sampler name", choices=tuple(diffusion.SAMPLERS))
    sampler_options: dict = field(
        default_factory=dict,
        metadata={
            "help": "the sampler's options, e.g. {v: 0.3} for ancestral (cfg.maths.samplers); defaults fill the rest"
        },
    )
    guidance: dict = field(
        default_factory=lambda: {"cfg": {}},
        metadata={
            "help": "guidance methods (cfg.maths.guidance.GUIDANCE), each swept over w with the same noise: label -> "
            "its options, e.g. {cfg: {}, interval: {lambda_lo: -3.0}, apg_b: {method: apg, eta: 1.0}}"
        },
    )
    steps: int = _p(64, "sampling steps T", ge=2)
    clip_denoised: float | None = _p(1.0, "clip x̂ to [-c, c] at every step; null disables", gt=0)
    n_samples: int = _p(1000, "generated images per (p_uncond, w) cell, classes balanced", ge=1)
    batch_size: int = _p(2000, "images per sampler batch (all w of an example share a batch)", ge=1)
    seed: int = _p(1, "seed of the sampling noise (the same noise for every w)")
    grid_per_class: int = _p(1, "rows per class in the sample-grid image", ge=1)
    compile: bool | str = _p(
        False,
        "torch.compile the network for sampling (and the FID curve's) on CUDA: true, false or a variant of "
        "cfg.engine.device.COMPILE_MODES (default, coordinate-descent, max-autotune: faster kernels for a longer "
        "first compile; regional: the repeated blocks one by one, static shapes: each batch size compiles again)",
        choices=tuple(COMPILE_MODES),
    )
    cudnn_benchmark: bool = _p(
        False,
        "CUDA: cuDNN picks each convolution's algorithm by its heuristics (false): the same choice on every GPU of "
        "a model, so the bytes do not depend on which GPU or how many processes sample; or times the candidates in "
        "every process and keeps the fastest (true: a few pixels may differ between GPUs, and each process's first "
        "batches take longer; within 0.4% of heuristics on the preset's cell on an H200, one run each)",
    )
    devices: int | str = _p(
        1,
        "processes (one per GPU) of the sample and evaluate stages: N, or all (every visible GPU; one process "
        "on CPU); no dep of either stage: any count gives the same samples and numbers",
        ge=1,
        choices=("all",),
    )


@dataclass
class EvaluateParams:
    extractor: str = _p("classifier", "feature extractor for FID/KID/PR", choices=tuple(EXTRACTORS))
    inception_weights: str | None = _p(None, "local path of pt_inception-2015-12-05 weights (inception only)")
    seed_ranges: int = _p(
        1, "split each cell's samples into this many independent seed ranges for a spread", ge=1
    )
    metrics: list[str] = _p(
        list(METRICS), "metrics of every cell (cfg.eval.metrics.METRICS)", choices=tuple(METRICS), unique=True
    )
    metric_options: dict = field(
        default_factory=dict,
        metadata={
            "help": "per metric, its options, e.g. {kid: {subsets: 50, subset_size: 200}, precision_recall: {k: 3}}"
        },
    )
    per_class_w: float | None = _p(0.0, "w of the cell that gets per-class FID; null disables")
    batch_size: int = _p(500, "images per feature-extractor batch", ge=1)


@dataclass
class TrackingParams:
    """Where runs are logged is no parameter: MLFLOW_TRACKING_URI or .cfg-lab.local.yaml (cfg.study.tracking)."""

    experiment: str = _p("cfg-lab", "MLflow experiment name", nonempty=True)


SEARCH_OBJECTIVES = ("fid", "fid_is")
SEARCH_SAMPLERS = tuple(SAMPLERS)
SEARCH_PRUNERS = tuple(PRUNERS)
SEARCH_PROMOTE = ("nondominated", "all")


@dataclass
class SearchParams:
    """`pipelines/search.py` (not a DVC stage); `space` is checked by cfg.search against this schema."""

    study_name: str = _p(
        "cfg-search", "Optuna study; workers with the same name and storage share it", nonempty=True
    )
    storage: str | None = _p(
        None,
        "SQLAlchemy URL of the study, e.g. postgresql://user@host/db (the password in PGPASSWORD or ~/.pgpass); "
        "null = sqlite optuna.db at the project root",
    )
    objective: str = _p(
        "fid", "fid: lowest FID; fid_is: FID down and IS up (the Pareto front)", choices=SEARCH_OBJECTIVES
    )
    n_trials: int = _p(12, "trials of the whole study, shared by all its workers", ge=1)
    sampler: str = _p("tpe", "Optuna sampler", choices=SEARCH_SAMPLERS)
    sampler_options: dict = field(
        default_factory=dict,
        metadata={"help": "keyword arguments of the sampler, e.g. {n_startup_trials: 5}"},
    )
    seed: int | None = _p(0, "sampler seed (the k-th worker to join a study uses seed + k); null = random")
    pruner: str = _p(
        "median",
        "pruner of fid trials on intermediate FIDs (fid_is trials use promote)",
        choices=SEARCH_PRUNERS,
    )
    pruner_options: dict = field(
        default_factory=dict, metadata={"help": "keyword arguments of the pruner, e.g. {n_startup_trials: 3}"}
    )
    w: list[float] = _p(
        [0.0, 0.3, 1.0],
        "guidance strengths scored per trial, FID taken at the best; unused when sample.w is in space",
        nonempty=True,
        unique=True,
        ge=-1,
    )
    eval_every: int = _p(200, "training steps between intermediate FIDs (fid: pruning)", ge=1)
    n_samples_cheap: int = _p(
        100, "samples per w of intermediate FIDs and cheap passes (the full count is sample.n_samples)", ge=2
    )
    promote: str = _p(
        "nondominated",
        "fid_is: trials whose cheap pass gets the full count: not dominated by a completed trial's, or all",
        choices=SEARCH_PROMOTE,
    )
    heartbeat_interval: int = _p(30, "seconds between heartbeats of a running trial", ge=1)
    grace_period: int = _p(
        120, "seconds without a heartbeat after which a trial is failed (worker crashed)", ge=2
    )
    max_retry: int = _p(1, "times a crashed worker's trial is run again", ge=0)
    space: dict = field(
        default_factory=dict,
        metadata={"help": "params.yaml key -> {low, high[, log][, step]} or {choices: [...]}"},
    )


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    guide: GuideParams = field(default_factory=GuideParams)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    search: SearchParams = field(default_factory=SearchParams)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Short sha256 of the named sections (all when none are named): ties a result to its settings."""
        d = self.to_dict()
        picked = {k: d[k] for k in (sections or d)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def _describe(rules: dict) -> str:
    parts = []
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in rules:
            parts.append(f"value {op} {rules[key]}")
    return " and ".join(parts)


def _check_scalar(where: str, value: Any, typ: Any, rules: dict) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if kinds == [int, str]:  # a count or a word, e.g. train.devices: 4 | all
            if isinstance(value, str) and value in rules.get("choices", ()):
                return value
            if isinstance(value, int) and not isinstance(value, bool) and value >= rules.get("ge", value):
                return value
            raise ParamsError(
                f"{where} = {value!r} is not allowed: give an integer >= {rules.get('ge')} or one of "
                f"{list(rules.get('choices', ()))}"
            )
        if kinds == [bool, str]:  # off, on or a named variant, e.g. sample.compile: true | max-autotune
            if isinstance(value, bool) or (isinstance(value, str) and value in rules.get("choices", ())):
                return value
            raise ParamsError(
                f"{where} = {value!r} is not allowed: give true, false or one of {list(rules.get('choices', ()))}"
            )
        (typ,) = kinds
    if typ is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where} = {value!r} must be true or false")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} = {value!r} must be an integer")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where} = {value!r} must be a number")
        if "decimal" in rules and isinstance(value, int):
            raise ParamsError(
                f"{where} = {value!r} must be written with a decimal point ({value}.0): {rules['decimal']}"
            )
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where} = {value!r} must be a string")
        if rules.get("nonempty") and not value:
            raise ParamsError(f"{where} must not be empty")
    if "choices" in rules and value not in rules["choices"]:
        raise ParamsError(f"{where} = {value!r} is not allowed; choose one of {list(rules['choices'])}")
    bounds = {"ge": value.__ge__, "gt": value.__gt__, "le": value.__le__, "lt": value.__lt__}
    for key, test in bounds.items():
        if key in rules and not test(rules[key]):
            why = f" ({rules['why']})" if "why" in rules else ""
            raise ParamsError(f"{where} = {value!r} is out of range: allowed {_describe(rules)}{why}")
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ParamsError(
            f"unknown key {prefix}{unknown[0]}; allowed keys{' of ' + where if where else ''}: {sorted(known)}"
        )
    values = {}
    for name, f in known.items():
        key = f"{where}.{name}" if where else name
        typ = hints[name]
        if name not in raw:
            continue
        value = raw[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, value, key)
        elif typ is dict:
            if not isinstance(value, dict | type(None)):
                raise ParamsError(f"{key} must be a mapping, got {value!r}")
            values[name] = value or {}
        elif typing.get_origin(typ) is list:
            (item_type,) = typing.get_args(typ)
            if not isinstance(value, list):
                raise ParamsError(f"{key} = {value!r} must be a list")
            if f.metadata.get("nonempty") and not value:
                raise ParamsError(f"{key} is an empty list; give at least one value")
            item_rules = {k: v for k, v in f.metadata.items() if k not in ("help", "nonempty", "unique")}
            values[name] = [
                _check_scalar(f"{key}[{i}]", v, item_type, item_rules) for i, v in enumerate(value)
            ]
            if f.metadata.get("unique") and len(set(values[name])) != len(values[name]):
                raise ParamsError(f"{key} = {value!r} has repeated values")
        else:
            values[name] = _check_scalar(key, value, typ, dict(f.metadata))
    return cls(**values)


def _refuse_secrets(raw: dict) -> None:
    """params.yaml is in git and a stage's params are in dvc.lock: neither the MLflow store nor a password."""
    from cfg.study.store import masked

    if "uri" in (raw.get("tracking") or {}):
        raise ParamsError(
            "tracking.uri is no parameter any more: set MLFLOW_TRACKING_URI or tracking_uri in the untracked "
            ".cfg-lab.local.yaml (so that moving the store reruns nothing and its password stays out of git), "
            "and delete tracking.uri"
        )
    storage = (raw.get("search") or {}).get("storage")
    if isinstance(storage, str) and masked(storage) != storage:
        raise ParamsError(
            f"search.storage = {masked(storage)!r} holds a password, and params.yaml is in git: give it in "
            "PGPASSWORD or ~/.pgpass, or the whole URL as --storage"
        )


def _refuse_non_finite(value: Any, where: str) -> None:
    """YAML reads .inf, -.inf and .nan as numbers; no setting of cfg-lab means one, wherever it stands (options
    and search spaces included), and NaN would pass every range check (each comparison is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{where} = {value!r} is not a finite number: give a finite value")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_non_finite(item, f"{where}[{i}]")


def _warn_unmeant(params: Params) -> None:
    """Allowed values that are probably slips: a `ParamsWarning` each, and the stage goes on."""
    if params.train.ema_decay == 0:
        warnings.warn(
            "train.ema_decay = 0.0 averages nothing: the EMA weights that are sampled are the last step's "
            "weights, as without an EMA; give e.g. 0.999 unless that is meant",
            ParamsWarning,
            stacklevel=3,
        )
    e = params.evaluate
    if e.per_class_w is not None and not _per_class_scored(params):
        warnings.warn(
            f"evaluate.per_class_w = {e.per_class_w} is not in sample.w {params.sample.w}: no cell gets per-class "
            "FID; give one of sample.w, or null to compute none",
            ParamsWarning,
            stacklevel=3,
        )


def params_from_dict(raw: dict) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`; raises `ParamsError`."""
    _refuse_secrets(raw)
    _refuse_non_finite(raw, "")
    params = _build(Params, raw, "")
    if params.train.lambda_min >= params.train.lambda_max:
        raise ParamsError(
            f"train.lambda_min = {params.train.lambda_min} must be below train.lambda_max = {params.train.lambda_max}"
        )
    t = params.train
    if t.cuda_graph and t.devices != 1:
        raise ParamsError(
            f"train.cuda_graph = true needs one train process (train.devices: 1), got train.devices = "
            f"{t.devices!r}: DDP's gradient all-reduce is not captured in the graph"
        )
    if t.compile_update and (t.compile is False or not t.cuda_graph):
        raise ParamsError(
            f"train.compile_update = true compiles the CUDA-graphed step's update along with the network: it needs "
            f"train.compile on and train.cuda_graph = true, got compile = {t.compile!r}, cuda_graph = {t.cuda_graph}"
        )
    if t.eval_every % t.log_every:
        raise ParamsError(
            f"train.eval_every = {t.eval_every} must be a multiple of train.log_every = {t.log_every} (or 0)"
        )
    _check_options(params)
    _check_levels(params, params.model, "model")
    _check_guide(params)
    _check_sample_counts(params)
    _check_reference_counts(params)
    _warn_unmeant(params)
    if params.evaluate.extractor == "inception" and params.evaluate.inception_weights:
        path = Path(params.evaluate.inception_weights)
        if not path.is_file():
            raise ParamsError(
                f"evaluate.inception_weights = {str(path)!r} does not exist; give the path of "
                "pt_inception-2015-12-05-6726825d.pth, or null to download it on a machine with internet"
            )
    return params


def _check_options(params: Params) -> None:
    """Registry options: every key known to its entry, of its default's type."""
    s, e = params.sample, params.evaluate
    try:
        diffusion.SAMPLERS.resolve(s.sampler, s.sampler_options, "sample.sampler_options")
        guidance_entries(s.guidance, s.sampler)
        for name, options in e.metric_options.items():
            if name not in e.metrics:
                raise ValueError(
                    f"evaluate.metric_options.{name} names no metric of evaluate.metrics = {e.metrics}"
                )
            if not isinstance(options, dict):
                raise ValueError(f"evaluate.metric_options.{name} = {options!r} must be a mapping of options")
            METRICS.resolve(name, options, f"evaluate.metric_options.{name}")
    except ValueError as err:
        raise ParamsError(str(err)) from None


# Channels, side when data.image_size is null, and classes of the registered data sets (cfg/data/datasets.py's
# loaders; None where the data decide): what the checks below need of the data before it is prepared.
# tests/test_config.py checks digits against its loader. A data set missing here skips those checks.
DATA_SHAPES: dict[str, tuple[int, int | None, int | None]] = {
    "digits": (1, 16, 10),
    "fashion_mnist": (1, 32, 10),
    "cifar10": (3, 32, 10),
    "image_folder": (3, None, None),
}


def _check_levels(params: Params, model: ModelParams, where: str) -> None:
    """The U-Net halves the image between levels (cfg.nets.unet.UNetConfig): the side must divide."""
    d, levels = params.data, len(model.channel_mult)
    side = d.image_size or DATA_SHAPES.get(d.name, (None, None, None))[1]
    if side and side % 2 ** (levels - 1):
        given = (
            f"data.image_size = {side}" if d.image_size else f"{d.name}'s side {side} (data.image_size: null)"
        )
        raise ParamsError(
            f"{where}.channel_mult = {model.channel_mult} halves the image {levels - 1} times, so its side "
            f"must be a multiple of {2 ** (levels - 1)}, and {given} is not: change either"
        )


def needs_guide(params: Params) -> bool:
    """Whether an entry of sample.guidance takes ε_u from a guide network (autoguidance): only then does the
    train_guide stage train one (cfg.maths.guidance.needs_guide_network)."""
    return needs_guide_network(guidance_entries(params.sample.guidance, params.sample.sampler))


def _check_guide(params: Params) -> None:
    """guide.model's keys and values always (its unknown keys and ranges, as every section's); when autoguidance
    is used, also a U-Net the image fits, and a warning when the guide is not weaker than the model (no fewer
    parameters, no fewer steps), with which autoguidance guides towards nothing, or when it spends more than half of
    its steps in the learning-rate warm-up."""
    model = _build(ModelParams, dataclasses.asdict(params.model) | params.guide.model, "guide.model")
    # its values as validated (numbers as floats where the schema says so): the train_guide stage lays them over the
    # model section itself (pipelines/train.py, a dep of the stage), so that the guide's network is decided there;
    # the merge above only checks them
    params.guide.model = {k: getattr(model, k) for k in params.guide.model}
    if not needs_guide(params):
        return
    _check_levels(params, model, "guide.model")
    steps, warm = params.guide.steps, params.train.warmup_steps
    if 2 * warm > steps:  # LambdaLR's warm-up: step k trains at min(1, k / warm) · train.lr
        mean_lr = (sum(min(1.0, k / warm) for k in range(1, steps + 1)) / steps) if warm else 1.0
        warnings.warn(
            f"guide.steps = {steps} with train.warmup_steps = {warm}: the guide network spends "
            f"{min(steps, warm) / steps:.0%} of its training in the models' learning-rate warm-up (mean lr "
            f"{mean_lr:.2f} x train.lr), so it may come out much weaker than a shorter-trained model; give it more "
            "guide.steps",
            ParamsWarning,
            stacklevel=3,
        )
    channels, default_side, classes = DATA_SHAPES.get(params.data.name, (None, None, None))
    side = params.data.image_size or default_side
    if not (channels and side and classes) or params.guide.steps < params.train.steps:
        return
    sizes = [_layer_sizes("unet", _unet_items(m, side, channels, classes))[2] for m in (model, params.model)]
    if sizes[0] >= sizes[1]:
        warnings.warn(
            f"the guide network of autoguidance is not weaker than the model: {sizes[0]:,} parameters against "
            f"{sizes[1]:,} and guide.steps = {params.guide.steps} against train.steps = {params.train.steps}; "
            "autoguidance guides away from a weaker model's errors (Karras et al. 2024), so give guide.model a "
            "smaller network (e.g. {base_width: 8}) or fewer guide.steps",
            ParamsWarning,
            stacklevel=3,
        )


def _chunk_sizes(n: int, parts: int) -> list[int]:
    """The sizes `torch.chunk(n, parts)` cuts n rows into, as cfg.eval.cells splits seed ranges: pieces of
    ceil(n / parts), the last one smaller, and fewer than `parts` pieces when n is not a multiple (9 -> 3, 3, 3 for 4)."""
    size = -(-n // parts)
    return [min(size, n - start) for start in range(0, n, size)]


def _per_class_scored(params: Params) -> bool:
    """Whether a cell of sample.w gets per-class FID: evaluate.per_class_w is set and one of the grid's w."""
    e = params.evaluate
    return e.per_class_w is not None and any(abs(w - e.per_class_w) < 1e-9 for w in params.sample.w)


def _sample_needs(params: Params) -> list[tuple[int, bool, bool, str]]:
    """What evaluate computes from one cell of sample.n_samples images, as (fewest samples, whether in each seed
    range, whether the reference set needs as many, why), read from cfg.eval.metrics and the evaluate stage: the
    noise-FID baseline and fid fit a covariance (>= 2, the reference's too), is one per split (>= 1, the samples
    only), kid's subsets are clipped to the samples (>= 2 left, of the reference too), precision_recall's k-th
    neighbour lies among the others (> k, in each set), per-class FID fits a covariance per class (>= 2 of each
    class on both sides: example i has class i mod K, and data.max_test keeps a prefix cycling through the classes);
    cfg.eval.cells.RANGE_METRICS score each seed range too."""
    from cfg.eval.cells import RANGE_METRICS

    e = params.evaluate
    o = {name: METRICS.resolve(name, e.metric_options.get(name)) for name in e.metrics}
    metric_needs = {
        "fid": lambda: (2, True, "fid fits a covariance, which needs >= 2"),
        # one sample per split, where the metric has a splits option
        "is": lambda: (
            o["is"].get("splits", 1),
            False,
            f"is needs >= {o['is'].get('splits', 1)} (one per split)",
        ),
        "kid": lambda: (2, True, "kid draws subsets of >= 2 (its subset_size is clipped to the samples)"),
        "precision_recall": lambda: (
            o["precision_recall"]["k"] + 1,
            True,
            f"precision_recall needs more than evaluate.metric_options.precision_recall.k = {o['precision_recall']['k']}",
        ),
    }
    needs = [(2, False, True, "the evaluate stage's noise-FID baseline fits a covariance, which needs >= 2")]
    for name in o:
        if name in metric_needs:
            least, reference, why = metric_needs[name]()
            needs.append((least, False, reference, why))
            if e.seed_ranges > 1 and name in RANGE_METRICS:
                needs.append((least, True, False, why))
    classes = DATA_SHAPES.get(params.data.name, (None, None, None))[2]
    if classes and _per_class_scored(params):
        why = f"per-class FID (evaluate.per_class_w = {e.per_class_w}) fits a covariance per class, which needs "
        needs.append(
            (2 * classes, False, True, why + f">= 2 of each of the {classes} classes of {params.data.name}")
        )
    return needs


def _n_samples_unit(params: Params) -> int:
    """sample.n_samples must be a multiple of this: evaluate.seed_ranges x the data's classes when seed ranges are
    scored (example i has class i mod K, so every range then holds each class equally often, and all ranges score
    the same number of samples, on which FID's bias depends), else 1."""
    from cfg.eval.cells import RANGE_METRICS

    e = params.evaluate
    if e.seed_ranges < 2 or not set(RANGE_METRICS) & set(e.metrics):
        return 1
    return e.seed_ranges * (DATA_SHAPES.get(params.data.name, (None, None, None))[2] or 1)


def _check_sample_counts(params: Params) -> None:
    """sample.n_samples and evaluate.seed_ranges give every metric of evaluate.metrics (and each seed range)
    the samples it needs; checked here, not after sampling, when evaluate would stop at the first metric."""
    e, n = params.evaluate, params.sample.n_samples
    for name, key, low in (
        ("is", "splits", 1),
        ("kid", "subsets", 1),
        ("kid", "subset_size", 2),
        ("precision_recall", "k", 1),
    ):
        value = METRICS.resolve(name, e.metric_options.get(name)).get(key) if name in e.metrics else None
        if value is not None and value < low:
            raise ParamsError(
                f"evaluate.metric_options.{name}.{key} = {value} is out of range: allowed value >= {low}"
            )
    needs = _sample_needs(params)
    classes = DATA_SHAPES.get(params.data.name, (None, None, None))[2]
    unit = _n_samples_unit(params)

    def problems(count: int) -> list[str]:
        found = [why for least, per_range, _, why in needs if not per_range and count < least]
        if e.seed_ranges > 1 and any(per_range for _, per_range, _, _ in needs):
            sizes = _chunk_sizes(count, e.seed_ranges)
            split = f"evaluate.seed_ranges = {e.seed_ranges} splits them into ranges of {sizes} (torch.chunk)"
            if len(sizes) != e.seed_ranges:
                found.append(f"{split}: {len(sizes)} ranges, not {e.seed_ranges}")
            else:
                found += [
                    f"{split}, and in each range {why}"
                    for least, per_range, _, why in needs
                    if per_range and min(sizes) < least
                ]
                if count % unit and not any(f.startswith(split) for f in found):
                    per = (
                        f"{e.seed_ranges} ranges x {classes} classes of {params.data.name}"
                        if classes
                        else f"{e.seed_ranges} ranges"
                    )
                    found.append(
                        f"{split}: each range must hold as many samples{' of each class' if classes else ''} as "
                        f"the others, or their spread mixes FIDs of other sample counts (a multiple of {unit}: {per})"
                    )
        return found

    found = problems(n)
    if not found:
        return
    lowest = next(count for count in range(1, 10**7) if not problems(count))
    if lowest > n:
        hint = f"give sample.n_samples >= {lowest}"
    else:  # uneven ranges: a larger count can fail where a smaller one works
        hint = f"give e.g. sample.n_samples = {next(c for c in range(n + 1, 10**7) if not problems(c))}"
    if any("evaluate.seed_ranges" in why for why in found):
        hint += f" (a multiple of {unit} splits evenly) or other evaluate.seed_ranges"
    what = "is too few for evaluate" if lowest > n else "does not split evenly for evaluate"
    raise ParamsError(f"sample.n_samples = {n} {what}: {'; '.join(found)}: {hint}")


def _check_reference_counts(params: Params) -> None:
    """data.max_test leaves the reference statistics (the test split's first images) what every metric of
    evaluate.metrics needs of them; checked here, not in evaluate after every model was trained and sampled."""
    m = params.data.max_test
    if m is None:
        return
    needs = [(least, why) for least, _, reference, why in _sample_needs(params) if reference]
    short = [why for least, why in needs if m < least]
    if short:
        least = max(least for least, _ in needs)
        raise ParamsError(
            f"data.max_test = {m} is too few for evaluate's reference statistics (the test split's first "
            f"images): {'; '.join(short)}: give data.max_test >= {least}, or null (the whole test split)"
        )


# ---------------------------------------------------------------------------------------------------------
# Memory: sizes that this machine cannot hold are refused before any work, with the estimate. Each estimate
# is a lower bound of what the stage allocates (terms below), so a refused setting certainly fails and a
# borderline one is left to run.
#
#   sample.n_samples  host: the sample stage's uint8 cell (W w x n_samples x C x H x W bytes) and int64 example
#                     ids and labels (16 bytes a sample); with P > 1 processes every rank gathers the whole cell
#                     (P + 2 copies with NCCL, 2P + 2 with gloo: shards, padded shards, all_gather buffers).
#                     The evaluate stage's: the cell, and per w the features and logits (float32, list and
#                     concatenation) and a float64 copy of the features for the statistics.
#   sample.batch_size device: one sampler batch, (batch_size // W) examples x W w rows, two network passes for
#                     w outside {0, -1} (cfg.maths.guidance.needed_passes), each row at least the largest
#                     input + output of one U-Net layer, plus the weights.
#   train.batch_size  device: batch_size / P images per process, each at least every U-Net layer's output
#                     (autograd keeps them for the backward pass), plus weights, gradients, Adam's two moments
#                     and the EMA (5 x 4 bytes a parameter).
#   evaluate.batch_size device: one extractor batch, each image at least the largest input + output of one
#                     layer (the classifier's, traced; Inception-v3's: 64 x 147^2 in and out, float32).
#
# Layer sizes come from a forward pass of the real network on one blank image (`_layer_sizes`). Elements are
# 2 bytes under bf16 autocast on CUDA, else 4. The device is the GPU this process uses (torch.cuda.mem_get_info:
# its free memory) on CUDA, host memory on CPU; host memory is the physical RAM (os.sysconf) or a smaller
# cgroup v2 limit. Data sets missing from DATA_SHAPES, and image_folder without data.image_size, skip the
# terms that need the image size.

# Inception-v3's largest layer input + output per image, float32: conv 2b's batch norm, 64 x 147 x 147 in and
# out; and its parameters (torchvision's Inception3 layout with 1008 classes, which torch-fidelity's port shares)
INCEPTION_LAYER_BYTES = 2 * 64 * 147 * 147 * 4
INCEPTION_PARAMETERS = 23_850_960


def _size(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"


def host_memory() -> int:
    """Bytes of memory this process may use: physical RAM, or a smaller cgroup v2 limit (a container's)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _gpu_memory() -> tuple[int, str]:
    """Free bytes of the GPU this process uses (its LOCAL_RANK under torchrun), and how a message says it."""
    import torch

    index = int(os.environ.get("LOCAL_RANK", "0"))
    free, _ = torch.cuda.mem_get_info(index)
    return free, f"cuda:{index} has {_size(free)} free"


@functools.lru_cache(maxsize=32)
def _layer_sizes(net: str, config: tuple) -> tuple[int, int, int]:
    """(largest input + output of one layer, sum of every layer's output, parameters) for one image, in
    elements, from a forward pass of the real network on one blank image (CPU, one thread, the global RNG
    restored: tens of milliseconds; the meta device would import sympy, ~1 s); `net` is "unet" or
    "classifier", `config` its config's items."""
    import torch

    from cfg.nets.classifier import Classifier, ClassifierConfig
    from cfg.nets.unet import UNet, UNetConfig

    peak, total = [0], [0]

    def elements(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel()
        return sum(elements(i) for i in x) if isinstance(x, tuple | list) else 0

    def hook(module, args, out) -> None:
        total[0] += elements(out)
        peak[0] = max(peak[0], elements(args) + elements(out))

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.set_num_threads(1)
        try:
            if net == "unet":
                c = UNetConfig(**dict(config))
                model, extra = UNet(c), (torch.zeros(1), torch.zeros(1, dtype=torch.long))  # λ, label
            else:
                c = ClassifierConfig(**dict(config))
                model, extra = Classifier(c), ()
            handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
            model.eval()(torch.zeros(1, c.in_channels, c.image_size, c.image_size), *extra)
            for h in handles:
                h.remove()
        finally:
            torch.set_num_threads(threads)
    return peak[0], total[0], sum(p.numel() for p in model.parameters())


def _unet_items(m: ModelParams, side: int, channels: int, classes: int) -> tuple:
    """A model section's U-Net for images of this side, channels and classes, as `_layer_sizes` takes it."""
    return (
        ("image_size", side),
        ("in_channels", channels),
        ("num_classes", classes),
        ("base_width", m.base_width),
        ("channel_mult", tuple(m.channel_mult)),
        ("blocks_per_level", m.blocks_per_level),
        ("attention_resolutions", tuple(m.attention_resolutions)),
        ("dropout", m.dropout),
        ("head_channels", m.head_channels),
    )


@dataclass(frozen=True)
class MemoryNeed:
    """What one size of params.yaml allocates: fixed + per_unit x its value, in bytes (a lower bound)."""

    key: str  # the size, e.g. "sample.n_samples"
    on_device: bool  # where batches run (the GPU on CUDA, host memory on CPU); else host memory
    fixed: float  # bytes whatever the value
    per_unit: float  # bytes per unit of the value
    how: str  # the terms, for the message


def memory_needs(
    params: Params, kind: str = "cpu", processes: int = 1, sample_processes: int | None = None
) -> list[MemoryNeed]:
    """The memory each size of params needs on `kind` ("cpu" or "cuda") with `processes` train processes and
    `sample_processes` (default: as many) sample and evaluate processes per host: the terms of the table above."""
    t, s, e = params.train, params.sample, params.evaluate
    channels, default_size, classes = DATA_SHAPES.get(params.data.name, (None, None, None))
    side, classes = params.data.image_size or default_size, classes or 10
    n_w, p = len(s.w), processes
    sp = processes if sample_processes is None else sample_processes
    pixels = channels * side * side if channels and side else 0
    copies = 1 if sp == 1 else (sp + 2 if kind == "cuda" else 2 * sp + 2)
    feature_dim, logits = (
        (2048, 1008) if e.extractor == "inception" else (params.classifier.feature_dim, classes)
    )
    needs = [
        MemoryNeed(
            "sample.n_samples",
            False,
            0,
            copies * (n_w * pixels + 16),
            f"the sample stage's images: {copies} cop{'y' if copies == 1 else 'ies'} of {n_w} w x "
            f"{pixels} bytes of uint8 image a sample, and 16 bytes of example index and label",
        ),
        MemoryNeed(
            "sample.n_samples",
            False,
            0,
            n_w * pixels + 8 + (feature_dim + logits) * 8 + feature_dim * 8,
            f"the evaluate stage's samples ({n_w} w x {pixels} bytes a sample), features and logits "
            f"({feature_dim} + {logits} float32, twice) and float64 features",
        ),
    ]
    if not pixels:
        return needs
    peak, every, n_params = _layer_sizes("unet", _unet_items(params.model, side, channels, classes))
    elem = 2 if kind == "cuda" and t.bf16 else 4  # bytes of an activation
    passes = sum(1 if w in (0.0, -1.0) else 2 for w in s.w)  # network rows per example
    needs.append(
        MemoryNeed(
            "sample.batch_size",
            True,
            n_params * 4,
            peak * elem * passes / n_w,
            f"one sampler batch: (batch_size // {n_w} w) examples x {passes} network rows (two passes for w "
            f"outside 0, -1), each >= {_size(peak * elem)} of activations, and {_size(n_params * 4)} of weights",
        )
    )
    needs.append(
        MemoryNeed(
            "train.batch_size",
            True,
            n_params * 20,
            every * elem / p,
            f"one training batch: batch_size / {p} process(es) x {_size(every * elem)} of activations an image "
            f"(kept for the backward pass), and {_size(n_params * 20)} of weights, gradients, Adam moments, EMA",
        )
    )
    if e.extractor == "inception":
        per_image, weights, layer = (
            INCEPTION_LAYER_BYTES,
            INCEPTION_PARAMETERS * 4,
            "Inception-v3's largest layer",
        )
    else:
        c = params.classifier
        config = (("in_channels", channels), ("num_classes", classes), ("image_size", side))
        config += (("width", c.width), ("feature_dim", c.feature_dim))
        peak, _, n_params = _layer_sizes("classifier", config)
        per_image, weights, layer = peak * 4, n_params * 4, "the classifier's largest layer"
    needs.append(
        MemoryNeed(
            "evaluate.batch_size",
            True,
            weights,
            per_image,
            f"one extractor batch: {_size(per_image)} an image (input and output of {layer}) and "
            f"{_size(weights)} of weights",
        )
    )
    return needs


def check_memory(params: Params, *, host_bytes: int | None = None, device_bytes: int | None = None) -> None:
    """Refuse, before any work, a size whose memory (`memory_needs`, a lower bound) exceeds what this machine
    has: host memory, and on CUDA the free memory of this process's GPU. `host_bytes` and `device_bytes`
    stand in for the machine's figures."""
    from cfg.engine.device import resolve_device
    from cfg.engine.distributed import n_processes

    try:
        kind = resolve_device(params.train.device).type
        processes = n_processes(params.train.devices, params.train.device)
        sample_processes = n_processes(params.sample.devices, params.train.device, "sample.devices")
    except (RuntimeError, ValueError):  # no GPU for train.device, too few for *.devices: launch says so
        return
    host = host_bytes if host_bytes is not None else host_memory()
    memory = {False: (host, f"this machine has {_size(host)} of memory")}
    memory[True] = memory[False]  # on CPU, batches run in host memory
    if kind == "cuda":
        given = (device_bytes, f"the GPU has {_size(device_bytes or 0)} free")
        memory[True] = given if device_bytes is not None else _gpu_memory()
    needs = memory_needs(params, kind, processes, sample_processes)
    for key in dict.fromkeys(need.key for need in needs):
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        mine = [
            (need, need.fixed + need.per_unit * value, *memory[need.on_device])
            for need in needs
            if need.key == key
        ]
        over = [m for m in mine if m[1] > m[2]]
        if not over:
            continue
        need, total, _, has = max(over, key=lambda m: m[1] / m[2])
        fit = min(max(0, int((have - n.fixed) // n.per_unit)) for n, _, have, _ in mine)
        if key == "sample.n_samples":  # a count that evaluate's seed ranges split evenly
            fit -= fit % _n_samples_unit(params)
        where = "GPU memory" if need.on_device and kind == "cuda" else "memory"
        raise ParamsError(
            f"{key} = {value} needs at least ~{_size(total)} of {where} for {need.how}; {has}: lower {key} "
            f"(at most ~{fit:,} fit)"
        )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml, and check its sizes against this machine's memory (`check_memory`);
    every error names the file, key, value and what is allowed."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"parameter file {str(path)!r} not found") from None
    try:
        params = params_from_dict(raw or {})
        check_memory(params)
    except ParamsError as e:
        raise ParamsError(f"{path.name}: {e}") from None
    return params


def describe_schema() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key: the README's parameter table is generated from it."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(typ):
                walk(typ, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            name = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
            rows.append((key, name, json.dumps(default), f.metadata.get("help", "")))

    walk(Params, "")
    return rows
