"""What the stages hand each other: the samples of one model (`SampleSet`, samples/p_uncond=<p>/samples.pt)
and the evaluated cells (`CellRecord`, results/cells/p_uncond=<p>.json), and the one function that names a
model's folder. The evaluate stage writes records; report, search and analysis read them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from cfg.io import atomic_save, load, write_json

# the settings that identify a cell (besides its model): one row of the trade-off table per distinct value
CELL_KEY = ("p_uncond", "w", "guidance", "guidance_options", "sampler", "sampler_options", "steps", "seed")
# columns that hold a dict, written to CSV and MLflow as one JSON string
OPTION_COLUMNS = ("guidance_options", "sampler_options")

_SAMPLES_FORMAT = "cfg-lab/samples/v2"


def p_uncond_name(p_uncond: float) -> str:
    """`p_uncond=<p>`: the folder (models/, samples/) and file stem (results/cells/) of one model, as DVC's
    `foreach` writes `${item}` for a float of params.yaml."""
    return f"p_uncond={float(p_uncond)!r}"


def options_json(options: dict) -> str:
    """A dict of options as the one JSON string that CSV and MLflow carry (sorted keys: equal dicts, equal strings)."""
    return json.dumps(options, sort_keys=True)


def guidance_name(guidance: str, options: dict) -> str:
    """A guidance method with its options, as run names, legends and tables show it: `cfg`,
    `interval lambda_hi=2 lambda_lo=-3` (sorted, numbers as %g)."""
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(options.items())]
    return " ".join([guidance, *parts])


@dataclass
class SampleSet:
    """The samples of one model: every (guidance method, w) of the grid for the same examples and noise.

    Row j of `images` is guidance method `guidance[j]` with `guidance_options[j]` at `w[j]`, the entry
    `guidance_label[j]` of sample.guidance (one method, its options and label may be given for every row: they are
    expanded to per-row lists; no label: the method's name, as in sample files written before labels were kept)."""

    images: Tensor  # (R, N, C, H, W) uint8: one row per (method, w)
    labels: Tensor  # (N,) int64: the class each example was conditioned on
    w: list[float]  # guidance strength of each row of images
    classes: list[str]  # class names in label order
    p_uncond: float  # label-dropout probability of the model
    guidance: list[str]  # cfg.maths.guidance.GUIDANCE entry of each row
    guidance_options: list[dict[str, Any]]  # its resolved options, per row
    sampler: str  # cfg.maths.samplers.SAMPLERS entry
    sampler_options: dict[str, Any]  # its resolved options, clip_denoised included
    steps: int  # sampling steps T
    seed: int  # sampling seed
    checkpoint: str  # path of the model's checkpoint
    train_run_id: str | None  # MLflow run of the training
    checkpoint_params_hash: str  # the params hash stored in the checkpoint
    guide_checkpoint: str | None = None  # path of autoguidance's guide network, when a method used one
    device: str = "cpu"
    seconds: float = 0.0  # wall time of sampling
    guidance_label: list[str] | None = None  # the sample.guidance key (label) of each row's entry
    # cfg.nets.hashing.state_dict_hash of the sampled (EMA) weights: which model this is, whatever its path or
    # run (None: a sample file written before it was kept)
    weights_hash: str | None = None

    def __post_init__(self) -> None:
        rows = len(self.w)
        if isinstance(self.guidance, str):
            self.guidance = [self.guidance] * rows
        if isinstance(self.guidance_options, dict):
            self.guidance_options = [dict(self.guidance_options) for _ in range(rows)]
        if self.guidance_label is None or isinstance(self.guidance_label, str):
            self.guidance_label = [self.guidance_label or g for g in self.guidance]
        if not len(self.guidance) == len(self.guidance_options) == len(self.guidance_label) == rows:
            raise ValueError(
                f"a sample set needs one guidance method, options and label per w row: {rows} w, "
                f"{len(self.guidance)} methods, {len(self.guidance_options)} option dicts, "
                f"{len(self.guidance_label)} labels"
            )

    @property
    def n_samples(self) -> int:
        return self.images.shape[1]

    def info(self) -> dict:
        """Everything but the tensors and class names (sample.json, MLflow)."""
        skip = {"images", "labels", "classes"}
        info = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        rate = self.images.shape[0] * self.n_samples / self.seconds if self.seconds else None
        return info | {"n_samples": self.n_samples, "images_per_s": rate}

    def save(self, path: str | Path) -> None:
        blob = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        atomic_save({"format": _SAMPLES_FORMAT, **blob}, path)

    @classmethod
    def load(cls, path: str | Path) -> SampleSet:
        blob = load(path, what="sample file", rerun="dvc repro sample@<p_uncond>")
        if not isinstance(blob, dict) or blob.pop("format", None) != _SAMPLES_FORMAT:
            raise ValueError(f"{path} is not a sample file of this cfg-lab version: rerun its sample stage")
        return cls(**blob)


# the identifiers among a trade-off row's columns (`CellRecord.row`): whoever reads results/tradeoff.csv reads them
# as text (`pd.read_csv(..., dtype=ID_DTYPES)`), or a hash of digits alone would come back as a number
ID_COLUMNS = ("checkpoint", "weights", "fingerprint", "mlflow_run_id")
ID_DTYPES = dict.fromkeys(ID_COLUMNS, str)


@dataclass
class CellRecord:
    """One evaluated (model, w) cell: its settings, metrics (a `cfg.eval.metrics.METRICS` entry's columns,
    plus `<m>_range_mean/std` over seed ranges), fingerprint and provenance."""

    p_uncond: float
    w: float
    guidance: str
    guidance_options: dict[str, Any]
    sampler: str
    sampler_options: dict[str, Any]
    steps: int
    seed: int
    n_samples: int
    extractor: str  # the feature extractor's registry name
    metrics: dict[str, float | None]  # column -> value, in registry order
    fingerprint: str  # Fingerprint.key()
    fingerprint_detail: dict[str, Any]  # Fingerprint.to_dict()
    checkpoint: str
    train_run_id: str | None = None
    n_per_range: int | None = None  # samples in each seed range
    ranges: dict[str, list[float]] = field(default_factory=dict)  # metric -> its value on each seed range
    per_class_fid: dict[str, float] | None = None  # class name -> FID of that class's samples
    chance_acc: float | None = None  # class_acc of always guessing the most common label (cfg.eval.sanity)
    noise_fid: float | None = None  # FID of as many uniform-noise images (cfg.eval.sanity.noise_fid)
    mlflow_run_id: str | None = None  # the cell's MLflow run
    guidance_label: str | None = None  # its entry's key in sample.guidance (None: records without one)
    weights_hash: str | None = None  # SampleSet.weights_hash: the sampled weights (None: not recorded)

    @property
    def label(self) -> str:
        """The cell's sample.guidance label: what tells two variants of one method apart (`rescale_07`)."""
        return self.guidance_label or self.guidance

    @property
    def name(self) -> str:
        """The cell's run name: `p_uncond=0.1 w=0.3`, then its sample.guidance label unless it is the paper's
        `cfg` (short, so that the UI's runs table shows it whole; the method and options are params)."""
        label = "" if self.label == self.guidance == "cfg" else f" {self.label}"
        return f"p_uncond={self.p_uncond:g} w={self.w:g}{label}"

    def params(self) -> dict[str, Any]:
        """The settings as MLflow params (options as one JSON string each)."""
        return {
            **{
                k: options_json(v) if k in OPTION_COLUMNS else v for k in CELL_KEY for v in [getattr(self, k)]
            },
            "extractor": self.extractor,
            "n_samples": self.n_samples,
        }

    def row(self) -> dict[str, Any]:
        """One flat row of results/tradeoff.csv: settings, metrics, then provenance."""
        return {
            "p_uncond": self.p_uncond,
            "w": self.w,
            "guidance": self.guidance,
            **self.metrics,
            "n_samples": self.n_samples,
            "n_per_range": self.n_per_range,
            "chance_acc": self.chance_acc,
            "noise_fid": self.noise_fid,
            "sampler": self.sampler,
            "steps": self.steps,
            "seed": self.seed,
            "sampler_options": options_json(self.sampler_options),
            "guidance_options": options_json(self.guidance_options),
            "extractor": self.extractor,
            "checkpoint": self.checkpoint,
            "weights": self.weights_hash,
            "fingerprint": self.fingerprint,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"cell record has unknown fields {unknown}: written by another cfg-lab version?")
        return cls(**d)


def write_cells(path: str | Path, records: list[CellRecord]) -> None:
    """The evaluate stage's output for one model: a JSON list of records."""
    write_json(path, [r.to_dict() for r in records])


def read_cells(path: str | Path) -> list[CellRecord]:
    """Records written by `write_cells`; a missing or foreign file names itself and the stage to rerun."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return [CellRecord.from_dict(r) for r in raw]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no cell records at {path}: run the evaluate stage (dvc repro evaluate)"
        ) from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a cell-record file: {e}; rerun the evaluate stage") from e


def read_study_cells(folder: str | Path, p_uncond: list[float]) -> list[CellRecord]:
    """Every record of a study: `read_cells` of each model's file in `folder`."""
    return [r for p in p_uncond for r in read_cells(Path(folder) / f"{p_uncond_name(p)}.json")]
