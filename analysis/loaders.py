"""Loading a project's evaluated cells: the MLflow store and the DVC experiments, raw (I/O) and tidy (pure).

Sources, joined on the MLflow run id of each cell:
- the MLflow store: one `cell` run per (p_uncond, w), nested under the `train` run of its model; its params
  are `CellRecord.params()`, its metrics the record's (`cfg/study/tracking.py:log_cell`);
- DVC: `dvc exp show --json` lists the workspace, its baseline commit and their experiments; each one's
  `results/tradeoff.csv` (`CellRecord.row()` per cell; a `cache: false` output, so committed with the
  experiment) names the MLflow cell run of every row (`mlflow_run_id`);
- the workspace's cell records (results/cells/*.json, `cfg.study.records.read_cells`) for the fingerprint
  fields of each cell.

Only `mlflow_frame`, `dvc_exp_show`, `dvc_tables`, `cell_records`, `load_runs` and `sample_grid_image` read
files, processes or the store; the tidy functions are pure pandas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.columns import (
    CELL_PARAMS,
    FINGERPRINT_FIELDS,
    LEADING,
    METRICS,
    TAGS,
    order_columns,
    type_cells,
)
from cfg.study.records import ID_DTYPES, p_uncond_name, read_cells
from cfg.study.store import project_root, tracking_uri
from cfg.study.ui import default_experiment


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
    """One row per finished cell run of `mlflow_frame`'s output: its params typed as the record's settings
    (`type_cells`), metrics (per-class FIDs too), provenance tags and the params of its train run (model.*,
    train.*, data.*)."""
    if raw.empty or "tags.run_kind" not in raw:
        return pd.DataFrame(columns=[c for c in LEADING if c != METRICS])
    cells = raw[(raw["tags.run_kind"] == "cell") & (raw["status"] == "FINISHED")]
    cells = cells.dropna(axis=1, how="all").reset_index(drop=True)  # other run kinds' params and metrics
    out = pd.DataFrame({"run_id": cells["run_id"], "run_name": cells["run_name"]})
    out["start_time"] = cells["start_time"]
    out["source"] = "mlflow"
    for name in CELL_PARAMS:
        out[name] = cells.get(f"params.{name}", pd.Series(None, index=cells.index, dtype=object))
    out = type_cells(out)
    for col in sorted(c for c in cells if c.startswith("metrics.")):
        out[col.removeprefix("metrics.")] = pd.to_numeric(cells[col])
    for name in TAGS + FINGERPRINT_FIELDS:
        if f"tags.{name}" in cells:
            tag = cells[f"tags.{name}"]
            out[name] = _coerce(tag) if name in FINGERPRINT_FIELDS else tag
    # the model's run: tag model_run_id (cells under a study run), else the parent (cells logged outside a study)
    parent = cells.get("tags.mlflow.parentRunId")
    out["train_run_id"] = (
        cells["tags.model_run_id"].fillna(parent) if "tags.model_run_id" in cells else parent
    )
    # the models' runs: train runs, or where the store lacks them (a clone) the sample stage's stand-ins
    models = raw[raw["tags.run_kind"].isin(["train", "sample"])].dropna(axis=1, how="all")
    trains = models.set_index("run_id") if "run_id" in models else models
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
                tables["workspace"] = pd.read_csv(root / table, dtype=ID_DTYPES)
            continue
        out = subprocess.run(
            ["git", "show", f"{r['rev']}:{table}"], cwd=root, capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            tables[r["rev"]] = pd.read_csv(StringIO(out.stdout), dtype=ID_DTYPES)
    return tables


def tidy_dvc(revisions: list[dict], tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (revision, trade-off table row), with the revision's name, time and params.yaml values; the
    cell settings typed as `tidy_mlflow` types them (`type_cells`)."""
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
        frames.append(type_cells(t))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])


def merge_sources(mlflow_cells: pd.DataFrame, dvc_rows: pd.DataFrame) -> pd.DataFrame:
    """MLflow cells with the DVC revisions that list them (`dvc_exps`, `dvc_revs`, `in_workspace`) and the
    params.yaml keys MLflow lacks; DVC rows whose run is not in the store are kept with source 'dvc'. Without
    any MLflow cell (no store, as in a clone that only pulled from DVC; another experiment; offline tracking)
    the DVC rows alone, with the MLflow frame's columns. The cell settings typed as both sources type them."""
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
    if m.empty:  # the DVC rows, typed as read (an empty frame's object columns would untype them in a concat)
        df = first.join(member).reset_index()
        df = df.reindex(columns=[*df.columns, *m.columns.difference(df.columns)])
    else:
        # the membership columns come from DVC; an MLflow frame may carry them (tidy_mlflow's empty one does)
        m = m.drop(columns=list(member.columns), errors="ignore").join(member, on="run_id")
        for col in first.columns.difference(m.columns):
            m[col] = m["run_id"].map(first[col])
        only_dvc = first.loc[~first.index.isin(m["run_id"])].join(member).reset_index()
        df = pd.concat([m, only_dvc], ignore_index=True) if not only_dvc.empty else m
    df["in_workspace"] = df["in_workspace"].fillna(False).astype(bool)
    return type_cells(df)


def cell_records(folder: str | Path) -> pd.DataFrame:
    """`fingerprint.<field>` columns by run_id from the evaluate stage's cell records (results/cells/*.json,
    read by `cfg.study.records.read_cells`); a file another cfg-lab version wrote is skipped with a warning."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            records = read_cells(path)
        except (
            ValueError
        ) as e:  # the workspace's results predate this code: MLflow's tags still label the runs
            warnings.warn(str(e), stacklevel=2)
            continue
        rows += [
            {"run_id": r.mlflow_run_id} | {f"fingerprint.{k}": v for k, v in r.fingerprint_detail.items()}
            for r in records
            if r.mlflow_run_id and r.fingerprint_detail
        ]
    return pd.DataFrame(rows, columns=["run_id", *FINGERPRINT_FIELDS])


def load_runs(
    uri: str
    | None = None,  # MLflow tracking URI; default: the project's store (cfg.study.tracking.tracking_uri)
    project_dir: str | Path | None = None,  # the DVC project; default: the one around the working directory
    experiment: str
    | None = None,  # MLflow experiment name; default: tracking.experiment of the project's params.yaml
    *,
    dvc: bool = True,  # also read `dvc exp show --json` and each revision's trade-off table
    table: str = "results/tradeoff.csv",  # the report stage's table (dvc.yaml), relative to project_dir
    cells: str = "results/cells",  # the evaluate stage's cell records (dvc.yaml), relative to project_dir
) -> pd.DataFrame:
    """Every evaluated cell of the store and the DVC experiments in one tidy frame: one row per `KEY`
    (run_id and the cell's settings, `cfg.study.records.CELL_KEY`), with every metric, the fingerprint and
    provenance; method options as one JSON column each and expanded (`sampler_options.v`)."""
    root = Path(project_dir).resolve() if project_dir else project_root()
    uri = uri or tracking_uri(root=root)
    experiment = experiment or default_experiment(root)
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
    folder = root / samples / p_uncond_name(p_uncond)
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
