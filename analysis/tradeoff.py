"""The FID / IS trade-off of a CFG study: every run in one tidy DataFrame, frontiers, ranking, the paper's shape.

Sources, joined on the MLflow run id of each cell:
- the MLflow store: one `cell` run per (p_uncond, w), nested under the `train` run of its model
  (`cfg/study/tracking.py`, `pipelines/evaluate.py`);
- DVC: `dvc exp show --json` lists the workspace, its baseline commit and their experiments; each one's
  `results/tradeoff.csv` (a `cache: false` output, so committed with the experiment) names the MLflow cell run
  of every row (`mlflow_run_id`).

Comparability, the choice made here: loading *labels*, comparing *refuses*. Every row carries its metric
fingerprint key (`fingerprint`; its fields as `fingerprint.<field>` where known), so a store that holds runs made
with several extractors or sample counts loads whole, and `fingerprint_groups` lists them. Every function that
sets numbers of different rows side by side (frontiers, ranking, curve shapes, the narrative) first calls
`require_comparable`, which raises `cfg.eval.metrics.FingerprintMismatch` for mixed fingerprints: pick one with
`select(df, fingerprint=...)`, or loop over `df.groupby("fingerprint")`. The paper's Table 1 (ImageNet,
Inception features) is compared on shape only (where the FID minimum falls, whether IS rises with w, how the
p_uncond values rank), never on values.

Everything below except the three loaders (`mlflow_frame`, `dvc_exp_show`, `dvc_tables`) is pure pandas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from cfg.eval.metrics import Fingerprint, FingerprintMismatch, check_comparable
from cfg.study.report import TABLE_COLUMNS
from cfg.study.tracking import project_root, tracking_uri

DATA = Path(__file__).resolve().parent / "data"

# the parameters of a cell run and their types; (run_id, p_uncond, w, sampler, steps, seed) identifies a row
CELL_PARAMS = {
    "p_uncond": float,
    "w": float,
    "sampler": str,
    "steps": int,
    "v": float,
    "seed": int,
    "extractor": str,
    "n_samples": int,
}
KEY = ["run_id", "p_uncond", "w", "sampler", "steps", "seed"]
# provenance tags of a cell run, kept as columns
TAGS = ["fingerprint", "git_commit", "params_hash", "dvc_stage", "dvc_exp_name", "host", "device"]
FINGERPRINT_FIELDS = [f"fingerprint.{f.name}" for f in fields(Fingerprint)]
# leading columns of the tidy frame, in order; parameters of the train run (model.*, train.*) and DVC's
# params.yaml follow
LEADING = [
    "run_id",
    *(c for c in TABLE_COLUMNS if c not in ("mlflow_run_id", "checkpoint")),
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


# ---------------------------------------------------------------------------------------------------------
# Loading: raw sources (I/O) and their tidy forms (pure)


def mlflow_frame(uri: str, experiment: str = "cfg-lab") -> pd.DataFrame:
    """Every run of `experiment` in the store at `uri`, flat: run_id, run_name, status, start_time, params.*,
    metrics.* (latest value), tags.*. Empty when the store file or the experiment does not exist."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        warnings.warn(f"no MLflow store at {uri}", stacklevel=2)
        return pd.DataFrame()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        warnings.warn(f"no experiment {experiment!r} in {uri}; it has {names}", stacklevel=2)
        return pd.DataFrame()
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        rows += [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": pd.Timestamp(r.info.start_time, unit="ms"),
                **{f"params.{k}": v for k, v in r.data.params.items()},
                **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
                **{f"tags.{k}": v for k, v in r.data.tags.items()},
            }
            for r in page
        ]
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _coerce(values: pd.Series) -> pd.Series:
    """MLflow stores params as strings: numbers become numbers, 'True'/'False' booleans, 'None' missing."""
    s = values.replace({"None": None, "null": None, "": None})
    present = s.dropna()
    if present.empty:
        return s
    if present.isin(["True", "False"]).all():
        return s.map({"True": True, "False": False})
    numeric = pd.to_numeric(present, errors="coerce")
    if numeric.notna().all():
        return pd.to_numeric(s)
    return s


def tidy_mlflow(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per finished cell run of `mlflow_frame`'s output: typed params, metrics (per-class FIDs too),
    provenance tags and the params of its train run (model.*, train.*, data.*)."""
    if raw.empty or "tags.run_kind" not in raw:
        return pd.DataFrame(columns=LEADING)
    cells = raw[(raw["tags.run_kind"] == "cell") & (raw["status"] == "FINISHED")]
    cells = cells.dropna(axis=1, how="all").reset_index(drop=True)  # other run kinds' params and metrics
    out = pd.DataFrame({"run_id": cells["run_id"], "run_name": cells["run_name"]})
    out["start_time"] = cells["start_time"]
    out["source"] = "mlflow"
    for name, typ in CELL_PARAMS.items():
        col = _coerce(cells.get(f"params.{name}", pd.Series(None, index=cells.index, dtype=object)))
        out[name] = col.astype("Int64") if typ is int and col.notna().all() else col
    for col in sorted(c for c in cells if c.startswith("metrics.")):
        out[col.removeprefix("metrics.")] = pd.to_numeric(cells[col])
    for tag in TAGS + [f.removeprefix("fingerprint.") for f in FINGERPRINT_FIELDS]:
        name = tag if tag in TAGS else f"fingerprint.{tag}"
        if f"tags.{name}" in cells:
            out[name] = (
                _coerce(cells[f"tags.{name}"]) if name in FINGERPRINT_FIELDS else cells[f"tags.{name}"]
            )
    out["train_run_id"] = cells.get("tags.mlflow.parentRunId")
    trains = raw[raw["tags.run_kind"] == "train"].dropna(axis=1, how="all").set_index("run_id")
    for col in sorted(c for c in trains if c.startswith("params.") and c.removeprefix("params.") not in out):
        by_run = trains[col].dropna()
        if not by_run.empty:
            out[col.removeprefix("params.")] = _coerce(out["train_run_id"].map(by_run))
    return out


def dvc_exp_show(project_dir: str | Path) -> list[dict]:
    """`dvc exp show --json` in `project_dir`: the workspace, its baseline commit and their experiments."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc") or "dvc"
    out = subprocess.run(
        [dvc, "exp", "show", "--json"], cwd=project_dir, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed in {project_dir}: {out.stderr.strip()}")
    return json.loads(out.stdout or "[]")


def dvc_revisions(exp_show: list[dict]) -> list[dict]:
    """Each revision of `dvc exp show --json` as {rev, name, timestamp, params}, params flattened to
    'section.key' (lists as text). The workspace is named 'workspace', a baseline by its branch or short sha."""
    revs = []

    def add(entry: dict, name: str | None) -> None:
        data = entry.get("data") or {}
        params = {}
        for file in (data.get("params") or {}).values():
            params |= _flatten(file.get("data") or {})
        revs.append(
            {
                "rev": entry["rev"],
                "name": name or entry.get("name") or entry["rev"][:7],
                "timestamp": data.get("timestamp"),
                "params": params,
            }
        )

    for entry in exp_show:
        add(entry, "workspace" if entry["rev"] == "workspace" else None)
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, exp.get("name") or rev.get("name"))
    return revs


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def dvc_tables(
    project_dir: str | Path, revisions: list[dict], table: str = "results/tradeoff.csv"
) -> dict[str, pd.DataFrame]:
    """The trade-off table of each revision: the workspace's file, committed revisions' through `git show`."""
    root = Path(project_dir)
    tables = {}
    for r in revisions:
        if r["rev"] == "workspace":
            if (root / table).exists():
                tables["workspace"] = pd.read_csv(root / table)
            continue
        out = subprocess.run(
            ["git", "show", f"{r['rev']}:{table}"], cwd=root, capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            tables[r["rev"]] = pd.read_csv(StringIO(out.stdout))
    return tables


def tidy_dvc(revisions: list[dict], tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (revision, trade-off table row), with the revision's name, time and params.yaml values."""
    frames = []
    for r in revisions:
        if r["rev"] not in tables:
            continue
        t = tables[r["rev"]].copy()
        t = t.rename(columns={"mlflow_run_id": "run_id"})
        if "run_id" not in t:
            t["run_id"] = None
        t["run_id"] = t["run_id"].where(t["run_id"].notna(), [f"dvc:{r['rev'][:7]}:{i}" for i in t.index])
        t["source"] = "dvc"
        t["dvc_rev"] = r["rev"]
        t["dvc_exp"] = r["name"]
        t["start_time"] = pd.Timestamp(r["timestamp"]) if r["timestamp"] else pd.NaT
        for k, v in r["params"].items():
            if k not in t:
                t[k] = v
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])


def merge_sources(mlflow_cells: pd.DataFrame, dvc_rows: pd.DataFrame) -> pd.DataFrame:
    """MLflow cells with the DVC revisions that list them (`dvc_exps`, `dvc_revs`, `in_workspace`) and the
    params.yaml keys MLflow lacks; DVC rows whose run is not in the store are kept with source 'dvc'."""
    m = mlflow_cells.copy()
    if dvc_rows.empty:
        m["dvc_exps"], m["dvc_revs"], m["in_workspace"] = None, None, False
        return m
    # committed revisions first: the workspace's params.yaml may be newer than its results
    d = dvc_rows.sort_values("dvc_rev", key=lambda s: s == "workspace", kind="stable")
    member = d.groupby("run_id", sort=False).agg(
        dvc_exps=("dvc_exp", lambda s: ", ".join(dict.fromkeys(s))),
        dvc_revs=("dvc_rev", lambda s: ", ".join(dict.fromkeys(s))),
        in_workspace=("dvc_rev", lambda s: bool((s == "workspace").any())),
    )
    first = d.drop(columns=["dvc_exp", "dvc_rev"]).drop_duplicates("run_id").set_index("run_id")
    m = m.join(member, on="run_id")
    for col in first.columns.difference(m.columns):
        m[col] = m["run_id"].map(first[col])
    only_dvc = first.loc[~first.index.isin(m["run_id"])].join(member).reset_index()
    df = pd.concat([m, only_dvc], ignore_index=True) if not only_dvc.empty else m
    df["in_workspace"] = df["in_workspace"].fillna(False).astype(bool)
    return df


def cell_records(folder: str | Path) -> pd.DataFrame:
    """`fingerprint.<field>` columns by run_id from the evaluate stage's cell records (results/cells/*.json)."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        for rec in json.loads(path.read_text()):
            if rec.get("mlflow_run_id") and rec.get("fingerprint_detail"):
                rows.append(
                    {"run_id": rec["mlflow_run_id"]}
                    | {f"fingerprint.{k}": v for k, v in rec["fingerprint_detail"].items()}
                )
    return pd.DataFrame(rows, columns=["run_id", *FINGERPRINT_FIELDS])


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """LEADING columns first (those present), the rest after, sorted; rows by p_uncond, w, start time."""
    cols = [c for c in LEADING if c in df] + sorted(c for c in df if c not in LEADING)
    return df[cols].sort_values(["p_uncond", "w", "start_time"], na_position="last").reset_index(drop=True)


def load_runs(
    uri: str
    | None = None,  # MLflow tracking URI; default: the project's store (cfg.study.tracking.tracking_uri)
    project_dir: str | Path | None = None,  # the DVC project; default: the one around the working directory
    experiment: str = "cfg-lab",  # MLflow experiment name (params.yaml: tracking.experiment)
    *,
    dvc: bool = True,  # also read `dvc exp show --json` and each revision's trade-off table
    table: str = "results/tradeoff.csv",  # the report stage's table (dvc.yaml), relative to project_dir
    cells: str = "results/cells",  # the evaluate stage's cell records (dvc.yaml), relative to project_dir
) -> pd.DataFrame:
    """Every evaluated cell of the store and the DVC experiments in one tidy frame: one row per
    (run_id, p_uncond, w, sampler, steps, seed), with every metric, the fingerprint and provenance."""
    root = Path(project_dir).resolve() if project_dir else project_root()
    uri = uri or tracking_uri(root=root)
    m = tidy_mlflow(mlflow_frame(uri, experiment))
    d = pd.DataFrame(columns=["run_id"])
    if dvc and (root / "dvc.yaml").exists():
        try:
            revisions = dvc_revisions(dvc_exp_show(root))
        except RuntimeError as e:  # e.g. a `dvc repro` holding the lock: the workspace's table only
            warnings.warn(f"{e}; reading only the workspace's {table}", stacklevel=2)
            revisions = [{"rev": "workspace", "name": "workspace", "timestamp": None, "params": {}}]
        d = tidy_dvc(revisions, dvc_tables(root, revisions, table))
    df = merge_sources(m, d)
    if df.empty:
        raise ValueError(
            f"no evaluated cells in the MLflow store {uri} (experiment {experiment!r}) or in {root}"
        )
    detail = cell_records(root / cells).drop_duplicates("run_id").set_index("run_id")
    for col in detail:
        known = df["run_id"].map(detail[col])
        df[col] = known if col not in df else df[col].where(df[col].notna(), known)
    return order_columns(df)


def sample_grid_image(
    study: pd.DataFrame,  # one study (select); its rows of `p_uncond` name the train run and the w grid
    p_uncond: float,
    project_dir: str | Path | None = None,  # holds samples/p_uncond=<p>/; default: project_root()
    uri: str | None = None,  # MLflow store to fetch the train run's samples/grid.png from otherwise
    samples: str = "samples",  # the sample stage's output folder (dvc.yaml), relative to project_dir
) -> tuple[np.ndarray, list[float]]:
    """The class-by-w sample grid of one p_uncond and its column w values: the workspace's grid (columns in
    sample.json's w order) when the study is the workspace's, else the train run's MLflow artifact (columns in
    the order its cells were evaluated, which is the sampled order)."""
    from PIL import Image

    rows = study[np.isclose(study["p_uncond"], p_uncond)]
    if rows.empty:
        raise ValueError(
            f"no rows with p_uncond={p_uncond}; the study has {sorted(study['p_uncond'].unique().tolist())}"
        )
    root = Path(project_dir).resolve() if project_dir else project_root()
    # dvc.yaml names the folder after the params.yaml value: 0.1 -> "0.1", 1 -> "1", 1.0 -> "1.0"
    folder = next(
        (f for f in (root / samples / f"p_uncond={v}" for v in (p_uncond, f"{p_uncond:g}")) if f.is_dir()),
        root / samples / f"p_uncond={p_uncond}",
    )
    in_workspace = rows["in_workspace"].all() if "in_workspace" in rows else False
    if in_workspace and (folder / "grid.png").exists() and (folder / "sample.json").exists():
        w = json.loads((folder / "sample.json").read_text())["w"]
        return np.asarray(Image.open(folder / "grid.png")), [float(x) for x in w]
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or tracking_uri(root=root))
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(rows["train_run_id"].iloc[0], "samples/grid.png", tmp)
        image = np.asarray(Image.open(path))
    w = rows.sort_values("start_time")["w"].tolist()
    if _grid_columns(image) != len(w):  # the artifact is the train run's latest grid, maybe of another w grid
        warnings.warn(
            f"the sample grid of p_uncond={p_uncond:g} has {_grid_columns(image)} columns, the study "
            f"{len(w)} w values {w}: it was sampled for another w grid",
            stacklevel=2,
        )
    return image, w


def _grid_columns(image: np.ndarray) -> int:
    """Tile columns of a cfg.data.images.tile_grid picture: runs of pixel columns between all-white separators."""
    white = (image.reshape(image.shape[0], image.shape[1], -1) == 255).all(axis=(0, 2))
    return int(np.sum(~white[1:] & white[:-1]))


# ---------------------------------------------------------------------------------------------------------
# Comparability and selection


def fingerprint_groups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per metric fingerprint: how many cells, which p_uncond and w, when, and its fields."""
    agg = {
        "cells": ("run_id", "size"),
        "p_uncond": ("p_uncond", lambda s: sorted(s.dropna().unique().tolist())),
        "w": ("w", lambda s: sorted(s.dropna().unique().tolist())),
        "first": ("start_time", "min"),
        "last": ("start_time", "max"),
    }
    agg |= {c: (c, "first") for c in FINGERPRINT_FIELDS if c in df}
    return df.fillna({"fingerprint": "(none)"}).groupby("fingerprint").agg(**agg).sort_values("last")


def require_comparable(df: pd.DataFrame) -> None:
    """Raise FingerprintMismatch unless every row of `df` has the same metric fingerprint."""
    if "fingerprint" not in df or df["fingerprint"].isna().any():
        raise FingerprintMismatch(
            "rows without a metric fingerprint cannot be compared; select rows that have one",
            ["fingerprint"],
        )
    keys = df["fingerprint"].unique()
    if len(keys) <= 1:
        return
    counts = df["fingerprint"].value_counts().to_dict()
    hint = (
        f"{len(keys)} metric fingerprints among {len(df)} rows ({counts}); compare within one: "
        "select(df, fingerprint=KEY) or df.groupby('fingerprint')"
    )
    detail = df.drop_duplicates("fingerprint")
    if all(c in df for c in FINGERPRINT_FIELDS) and detail[FINGERPRINT_FIELDS].notna().all(axis=None):
        try:
            check_comparable(
                [
                    {c.removeprefix("fingerprint."): r[c] for c in FINGERPRINT_FIELDS}
                    for _, r in detail.iterrows()
                ]
            )
        except FingerprintMismatch as e:
            raise FingerprintMismatch(f"{e}. {hint}", e.fields) from None
    raise FingerprintMismatch(f"metrics are not comparable: {hint}", ["fingerprint"])


def select(
    df: pd.DataFrame,
    which: str = "workspace",  # 'workspace', 'latest', or a DVC experiment name / revision prefix
    *,
    fingerprint: str | None = None,  # keep only rows with this fingerprint key first
) -> pd.DataFrame:
    """The cells of one study, one row per (p_uncond, w).

    'workspace': the rows of the workspace's trade-off table (what the report shows), else 'latest';
    'latest': the newest evaluate batch, i.e. the rows sharing the newest row's fingerprint, parameters hash and
    commit; otherwise the rows of the DVC experiment or revision named `which`. Within the choice the newest row
    of each (p_uncond, w, sampler, steps, v, seed) is kept.
    """
    if fingerprint is not None:
        df = df[df["fingerprint"] == fingerprint]
        if df.empty:
            raise ValueError(f"no rows with fingerprint {fingerprint!r}")
    if which == "workspace":
        ws = df[df["in_workspace"]] if "in_workspace" in df else df.iloc[:0]
        return _newest_per_cell(ws) if not ws.empty else select(df, "latest")
    if which == "latest":
        newest = df.loc[df["start_time"].idxmax()] if df["start_time"].notna().any() else df.iloc[-1]
        batch = df
        for col in ("fingerprint", "params_hash", "git_commit"):
            if col in df and pd.notna(newest[col]):
                batch = batch[batch[col] == newest[col]]
        return _newest_per_cell(batch)
    hits = pd.Series(False, index=df.index)
    for col in ("dvc_exps", "dvc_revs"):
        if col in df:
            names = df[col].fillna("").str.split(", ")
            hits |= names.map(lambda ns: any(n == which or n.startswith(which) for n in ns if n))
    if not hits.any():
        known = sorted({n for s in df.get("dvc_exps", pd.Series()).dropna() for n in s.split(", ")})
        raise ValueError(f"no rows of DVC experiment or revision {which!r}; known: {known}")
    return _newest_per_cell(df[hits])


def _newest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    cell = [c for c in ("p_uncond", "w", "sampler", "steps", "v", "seed") if c in df]
    return (
        df.sort_values("start_time", na_position="first")
        .drop_duplicates(cell, keep="last")
        .sort_values(["p_uncond", "w"])
        .reset_index(drop=True)
    )


# ---------------------------------------------------------------------------------------------------------
# Frontiers: FID (lower is better) against IS (higher is better)


def pareto_mask(fid: np.ndarray, is_: np.ndarray) -> np.ndarray:
    """True where no other point has FID <= and IS >= with one of them strict (the FID-vs-IS Pareto set)."""
    fid, is_ = np.asarray(fid, float), np.asarray(is_, float)
    no_worse = (fid[None, :] <= fid[:, None]) & (is_[None, :] >= is_[:, None])  # [i, j]: j no worse than i
    better = (fid[None, :] < fid[:, None]) | (is_[None, :] > is_[:, None])
    return ~(no_worse & better).any(axis=1)


def hypervolume(fid: np.ndarray, is_: np.ndarray, ref_fid: float, ref_is: float) -> float:
    """Area of the (IS, FID) region the points dominate, bounded by the reference point (worst IS, worst FID)."""
    pts = sorted(
        ((i, f) for f, i in zip(fid, is_, strict=True) if f <= ref_fid and i >= ref_is), key=lambda p: -p[0]
    )
    area, best_fid = 0.0, ref_fid
    for k, (i, f) in enumerate(
        pts
    ):  # sweep from the largest IS down; each strip's height is its best FID yet
        best_fid = min(best_fid, f)
        next_is = pts[k + 1][0] if k + 1 < len(pts) else ref_is
        area += (i - next_is) * (ref_fid - best_fid)
    return area


def _curves(df: pd.DataFrame, by: str) -> pd.DataFrame:
    require_comparable(df)
    dup = df.duplicated([by, "w"])
    if dup.any():
        raise ValueError(
            f"several rows for the same ({by}, w), e.g. {df.loc[dup, [by, 'w']].iloc[0].tolist()}: "
            "pick one study first with select(df, ...)"
        )
    return df.sort_values([by, "w"]).reset_index(drop=True)


def frontiers(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """`df` (one study) with a `pareto` column: whether the cell is on its `by` curve's FID-vs-IS frontier."""
    out = _curves(df, by)
    out["pareto"] = False
    for _, g in out.groupby(by):
        out.loc[g.index, "pareto"] = pareto_mask(g["fid"].to_numpy(), g["is"].to_numpy())
    return out


def frontier_fid(front_fid: np.ndarray, front_is: np.ndarray, is_lo: float, is_hi: float) -> float:
    """Mean FID of a Pareto front, linearly interpolated in IS, over [is_lo, is_hi] (NaN outside its span)."""
    order = np.argsort(front_is)
    xs, ys = np.asarray(front_is, float)[order], np.asarray(front_fid, float)[order]
    if not (is_lo < is_hi) or is_lo < xs[0] - 1e-12 or is_hi > xs[-1] + 1e-12:
        return np.nan
    grid = np.linspace(is_lo, is_hi, 257)
    return float(np.interp(grid, xs, ys).mean())


def rank_frontiers(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """Each `by` curve's FID-vs-IS Pareto front and how it ranks against the others.

    Columns: n_w, n_pareto, pareto_w; `frontier_fid`, the front's mean FID at equal IS over the IS range that
    every front spans (lower: better trade-off; NaN when the fronts share no IS range); `hypervolume`, the area
    the front dominates up to the reference point (the worst IS and FID of all curves, 10% of their span
    further) as a share of the box between that point and the best values (higher: better; coarse on sparse
    grids);
    `dominated_share`, the share of its Pareto points that another curve's front dominates; `rank` (1 = best),
    by frontier_fid, or by hypervolume where the fronts share no IS range.
    """
    f = frontiers(df, by)
    # reference point 10% of the span beyond the worst IS and FID, so that extreme points count too
    margin_fid, margin_is = 0.1 * np.ptp(f["fid"]), 0.1 * np.ptp(f["is"])
    ref_fid, ref_is = f["fid"].max() + margin_fid, f["is"].min() - margin_is
    box = (f["is"].max() - ref_is) * (ref_fid - f["fid"].min())
    front = f[f["pareto"]]
    spans = front.groupby(by)["is"].agg(["min", "max"])
    is_lo, is_hi = spans["min"].max(), spans["max"].min()
    rows = {}
    for key, g in f.groupby(by):
        mine = g[g["pareto"]]
        others = front[front[by] != key]
        dominated = [
            bool(
                (
                    (others["fid"] <= r["fid"])
                    & (others["is"] >= r["is"])
                    & ((others["fid"] < r["fid"]) | (others["is"] > r["is"]))
                ).any()
            )
            for _, r in mine.iterrows()
        ]
        hv = hypervolume(mine["fid"].to_numpy(), mine["is"].to_numpy(), ref_fid, ref_is)
        rows[key] = {
            "n_w": len(g),
            "n_pareto": len(mine),
            "pareto_w": mine["w"].tolist(),
            "frontier_fid": frontier_fid(mine["fid"].to_numpy(), mine["is"].to_numpy(), is_lo, is_hi),
            "hypervolume": hv / box if box > 0 else np.nan,
            "dominated_share": float(np.mean(dominated)) if dominated else np.nan,
        }
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)
    # ties within rounding are ties
    if out["frontier_fid"].notna().all() and len(out) > 1:
        rank = out["frontier_fid"].round(9).rank(method="min")
    else:
        rank = out["hypervolume"].round(9).rank(ascending=False, method="min")
    out["rank"] = rank.astype("Int64") if rank.notna().all() else pd.array([pd.NA] * len(out), dtype="Int64")
    out.attrs["is_range"] = (is_lo, is_hi)
    return out


# ---------------------------------------------------------------------------------------------------------
# Curve shapes and the paper


def curve_shapes(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """Per `by` curve: where FID is lowest and whether the minimum lies inside the w grid with FID falling
    before and rising after it (U shape), how far the best FID is from the next best in units of its
    uncertainty (fid_range_std), whether IS rises monotonically with w (and where it falls), and the frontier
    columns of `rank_frontiers`."""
    rows = {}
    for key, g in _curves(df, by).groupby(by):
        fid, is_, w = g["fid"].to_numpy(), g["is"].to_numpy(), g["w"].to_numpy()
        k = int(np.argmin(fid))
        second = np.sort(fid)[1] if len(fid) > 1 else np.nan
        sd = g["fid_range_std"].iloc[k] if "fid_range_std" in g else np.nan
        drops = [f"{w[i]:g}->{w[i + 1]:g}" for i in range(len(w) - 1) if is_[i + 1] < is_[i]]
        rows[key] = {
            "w_grid": w.tolist(),
            "best_fid": fid[k],
            "best_fid_w": w[k],
            "fid_min_inside": 0 < k < len(w) - 1,
            "fid_u_shaped": bool(
                0 < k < len(w) - 1 and np.all(np.diff(fid[: k + 1]) <= 0) and np.all(np.diff(fid[k:]) >= 0)
            ),
            "best_fid_margin_sd": (second - fid[k]) / sd if sd and sd > 0 else np.nan,
            "max_is": is_.max(),
            "max_is_w": w[int(np.argmax(is_))],
            "is_monotonic": not drops,
            "is_drops": ", ".join(drops),
        }
    shapes = pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)
    return shapes.join(rank_frontiers(df, by))


def paper_table1() -> pd.DataFrame:
    """Ho & Salimans (2022) Table 1, ImageNet 64x64: FID and IS per (p_uncond, w), one fingerprint of its own."""
    t = pd.read_csv(DATA / "cfg_paper_table1.csv")
    return t.assign(fingerprint="paper-table1", sampler="ancestral", v=0.3, source="paper")


def _on_grid(df: pd.DataFrame, w: list[float]) -> pd.DataFrame:
    return df[np.isclose(df["w"].to_numpy()[:, None], np.asarray(w)[None, :]).any(axis=1)]


def compare_to_paper(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our curves' shape beside the paper's, per p_uncond, both on the w values the two grids share (our whole
    grid when fewer than two are shared): best-FID w, U shape, IS monotonicity and frontier rank
    (the paper ranked among our p_uncond values when it has them). attrs: shared_w, rank_agreement (Kendall tau
    of the two rankings over the p_uncond both have)."""
    paper = paper_table1() if paper is None else paper
    shared = sorted(w for w in df["w"].unique() if np.isclose(paper["w"].to_numpy(), w).any())
    grid = shared if len(shared) >= 2 else sorted(df["w"].unique())
    ours = curve_shapes(_on_grid(df, grid))
    common_p = sorted(p for p in df["p_uncond"].unique() if np.isclose(paper["p_uncond"], p).any())
    paper_p = paper[paper["p_uncond"].isin(common_p)] if len(common_p) >= 2 else paper
    theirs = curve_shapes(_on_grid(paper_p, grid) if len(shared) >= 2 else paper_p)
    cols = ["best_fid_w", "fid_min_inside", "fid_u_shaped", "is_monotonic", "rank"]
    out = ours[cols].add_suffix("_ours").join(theirs[cols].add_suffix("_paper"), how="outer")
    out = out[[f"{c}_{s}" for c in cols for s in ("ours", "paper")]]
    both = out[["rank_ours", "rank_paper"]].dropna().astype(float)
    tau = both["rank_ours"].corr(both["rank_paper"], method="kendall") if len(both) >= 2 else np.nan
    out.attrs = {
        "shared_w": [float(w) for w in shared],
        "grid_w": [float(w) for w in grid],
        "rank_agreement": float(tau),
    }
    return out


# ---------------------------------------------------------------------------------------------------------
# The findings in words


def _ps(values) -> str:
    return ", ".join(f"{v:g}" for v in values) or "none"


def _ranking(r: pd.DataFrame) -> str:
    by_front = r["frontier_fid"].notna().all() and len(r) > 1
    col, fmt = ("frontier_fid", ".4g") if by_front else ("hypervolume", ".2f")
    lo, hi = r.attrs.get("is_range", (np.nan, np.nan))
    how = (
        f"mean FID of each p_uncond's Pareto front at equal IS, over IS {lo:.4g} to {hi:.4g}"
        if by_front
        else "share of the FID-vs-IS box each p_uncond's Pareto front dominates"
    )
    tiers = [
        " = ".join(f"{p:g} ({v:{fmt}})" for p, v in g[col].items())
        for _, g in r.sort_values("rank").groupby("rank", sort=True)
    ]
    return f"{' > '.join(tiers)} ({how})"


def narrative(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> str:
    """A short markdown account of one study, generated from its numbers: best FID and its w, IS monotonicity,
    the p_uncond ranking by frontier, and how the curves' shape compares with the paper's Table 1."""
    shapes = curve_shapes(df)
    ranks = rank_frontiers(df)
    best = df.loc[df["fid"].idxmin()]
    n = f"{int(best['n_samples'])} samples each, " if pd.notna(best.get("n_samples")) else ""
    lines = [
        f"- **Best FID {best['fid']:.4g}** at w = {best['w']:g}, p_uncond = {best['p_uncond']:g} "
        f"({len(df)} cells, {n}fingerprint `{best['fingerprint']}`).",
    ]
    where = {
        p: "inside the grid, U-shaped"
        if s.fid_u_shaped
        else ("inside the grid, not U-shaped" if s.fid_min_inside else "at the edge of the grid")
        for p, s in shapes.iterrows()
    }
    lines.append(
        "- FID is lowest at "
        + "; ".join(f"w = {s.best_fid_w:g} for p_uncond {p:g} ({where[p]})" for p, s in shapes.iterrows())
        + "."
    )
    margins = shapes["best_fid_margin_sd"].dropna()
    if not margins.empty:
        within = [p for p, m in margins.items() if m < 1]
        lines.append(
            "- The best w beats the next best by "
            + ", ".join(f"{m:.2g} sd for p_uncond {p:g}" for p, m in margins.items())
            + " (sd: fid_range_std, FID's spread over disjoint seed ranges): "
            + (f"within the noise for p_uncond {_ps(within)}." if within else "more than the noise.")
        )
    falling = shapes[~shapes["is_monotonic"]]
    drops = "; ".join(f"{p:g} (w {s.is_drops})" for p, s in falling.iterrows())
    if falling.empty:
        lines.append("- IS rises monotonically with w for every p_uncond.")
    elif len(falling) == len(shapes):
        lines.append(f"- IS does not rise monotonically with w for any p_uncond; it falls for {drops}.")
    else:
        rising = shapes.index[shapes["is_monotonic"]].tolist()
        lines.append(f"- IS rises monotonically with w for p_uncond {_ps(rising)}; it falls for {drops}.")
    lines.append(
        f"- Frontier ranking: {_ranking(ranks)}. Pareto-optimal w: "
        + "; ".join(f"{_ps(r.pareto_w)} for p_uncond {p:g}" for p, r in ranks.iterrows())
        + "."
    )
    cmp = compare_to_paper(df, paper)
    ours = cmp.dropna(subset=["best_fid_w_ours"])
    theirs = cmp.dropna(subset=["best_fid_w_paper"])
    same = [
        p
        for p, r in cmp.dropna(subset=["best_fid_w_ours", "best_fid_w_paper"]).iterrows()
        if np.isclose(r.best_fid_w_ours, r.best_fid_w_paper)
    ]
    tau = cmp.attrs["rank_agreement"]

    def which(col: pd.Series) -> str:
        yes = col.index[col.astype(bool)].tolist()
        return "all" if len(yes) == len(col) else ("none" if not yes else f"p_uncond {_ps(yes)}")

    def order(frame: pd.DataFrame, col: str) -> str:
        return " > ".join(" = ".join(f"{p:g}" for p in g.index) for _, g in frame.groupby(col, sort=True))

    def minima(frame: pd.DataFrame, col: str) -> str:
        return "; ".join(f"w = {w:g} for p_uncond {_ps(g.index)}" for w, g in frame.groupby(col))

    grids = (
        f"on the w values both grids have ({_ps(cmp.attrs['shared_w'])})"
        if len(cmp.attrs["shared_w"]) >= 2
        else "each on its own w grid (they share fewer than two w values)"
    )
    lines += [
        f"- Against the paper's Table 1 (ImageNet 64x64), {grids}:",
        f"  - FID minimum: paper {minima(theirs, 'best_fid_w_paper')}; ours {minima(ours, 'best_fid_w_ours')}"
        f" (the same w for {'p_uncond ' + _ps(same) if same else 'no p_uncond'}).",
        f"  - FID U-shaped in w (minimum inside the grid): paper {which(theirs['fid_u_shaped_paper'])}; "
        f"ours {which(ours['fid_u_shaped_ours'])}.",
        f"  - IS rising monotonically with w: paper {which(theirs['is_monotonic_paper'])}; "
        f"ours {which(ours['is_monotonic_ours'])}.",
        f"  - p_uncond ranked by frontier: paper {order(theirs, 'rank_paper')}; ours {order(ours, 'rank_ours')}"
        + (f" (Kendall tau {tau:+.2f})." if pd.notna(tau) else "."),
    ]
    return "\n".join(lines)
