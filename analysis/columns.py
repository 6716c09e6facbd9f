"""The columns of the tidy run table, read off the cell record (`cfg.study.records.CellRecord`).

A cell's settings and their types come from `CellRecord.params()` and the record's field types, the key of a
row from `CELL_KEY`, the column order from `CellRecord.row()`: a setting added to the record reaches the
table without a second list here. Method options (`OPTION_COLUMNS`) stay one canonical JSON string column
each, the key to group and deduplicate on (equal dicts, equal strings, whatever sampler), and are also
expanded to one typed column per option (`sampler_options.v`) to filter and plot by.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import get_type_hints

import pandas as pd

from cfg.eval.fingerprint import Fingerprint
from cfg.study.records import CELL_KEY, OPTION_COLUMNS, CellRecord, options_json

# where CellRecord.row() puts the metric columns, whose names depend on the evaluated METRICS entries
METRICS = "<metrics>"
# a record without values, to read the names and order of its params and row off the record type itself
_BLANK = CellRecord(**{f.name: None for f in fields(CellRecord)} | {"metrics": {METRICS: None}})
_TYPES = get_type_hints(CellRecord)

# the settings of a cell run (its MLflow params) and their types; options are JSON strings
CELL_PARAMS: dict[str, type] = {k: str if k in OPTION_COLUMNS else _TYPES[k] for k in _BLANK.params()}
# what identifies a row: the MLflow run and the cell's settings
KEY = ["run_id", *CELL_KEY]
# provenance tags of a cell run, kept as columns
TAGS = ["fingerprint", "weights", "git_commit", "params_hash", "dvc_stage", "dvc_exp_name", "host", "device"]
FINGERPRINT_FIELDS = [f"fingerprint.{f.name}" for f in fields(Fingerprint)]
# leading columns of the tidy frame, in order (METRICS: the metric columns present); parameters of the train
# run (model.*, train.*) and DVC's params.yaml follow, sorted
LEADING = [
    "run_id",
    *(c for c in _BLANK.row() if c not in ("mlflow_run_id", "checkpoint")),
    *FINGERPRINT_FIELDS,
    "train_run_id",
    "run_name",
    "start_time",
    "source",
    "dvc_exps",
    "dvc_revs",
    "in_workspace",
    "git_commit",
    "params_hash",
]


def _options(value) -> dict | None:
    if isinstance(value, dict):
        return value
    return json.loads(value) if isinstance(value, str) else None  # missing: NaN or None


def tidy_options(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with each option column (`sampler_options`, ...) as its canonical JSON string and one typed
    column per option, `<column>.<option>`, NaN where a row's method lacks it. Read the same way from MLflow
    params and from the trade-off table, so both sources give equal keys."""
    out = df.copy()
    for col in OPTION_COLUMNS:
        if col not in out:
            continue
        out = out.drop(columns=[c for c in out if c.startswith(f"{col}.")])  # stale: recomputed below
        dicts = [_options(v) for v in out[col]]
        out[col] = [options_json(d) if d is not None else None for d in dicts]
        wide = pd.json_normalize([d or {} for d in dicts]).set_index(out.index)
        for opt in wide:
            out[f"{col}.{opt}"] = wide[opt]
    return out


def type_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The cell settings of `df` in their record types (floats, nullable ints, strings) and its options tidied
    (`tidy_options`): MLflow params arrive as text, the trade-off table as CSV."""
    out = df.copy()
    for name, typ in CELL_PARAMS.items():
        if name not in out:
            continue
        s = out[name].replace({"None": None, "null": None, "": None})
        if typ is float:
            s = pd.to_numeric(s)
        elif typ is int:
            s = pd.to_numeric(s).astype("Int64")
        out[name] = s
    return tidy_options(out)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a tidy frame, in its order: numeric columns that are no setting, tag or dotted
    parameter (train.*, params.yaml, fingerprint.*, options)."""
    known = set(LEADING) | set(TAGS) | set(CELL_PARAMS)
    numeric = df.select_dtypes("number").columns
    return [c for c in df if c in numeric and c not in known and "." not in c]


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """LEADING columns first (those present; each option column followed by its options), the rest after,
    sorted; rows by p_uncond, w, start time."""
    lead: list[str] = []
    for c in LEADING:
        if c == METRICS:
            lead += metric_columns(df)
        elif c in df:
            lead += [c, *(o for o in df if c in OPTION_COLUMNS and o.startswith(f"{c}."))]
    cols = lead + sorted(c for c in df if c not in lead)
    return df[cols].sort_values(["p_uncond", "w", "start_time"], na_position="last").reset_index(drop=True)
