"""MLflow at the edge: where runs are stored, how they are tagged, and the UI command.

The store defaults to a SQLite file ``mlflow.db`` at the project root, resolved to an absolute path. DVC runs
``dvc exp run --temp`` / ``--queue`` experiments in copies of the workspace under ``.dvc/tmp/exps/``, so the
root is taken from above that folder: every copy logs to the one store and one artifact folder.
Order of precedence: the MLFLOW_TRACKING_URI environment variable, then ``tracking.uri`` in params.yaml,
then the default.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_EXPS_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def project_root(start: str | Path | None = None) -> Path:
    """The project folder, looking through DVC's temporary experiment copies to the workspace they came from."""
    here = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    text = str(here) + os.sep
    if _EXPS_MARKER in text:
        return Path(text.split(_EXPS_MARKER)[0])
    for parent in (here, *here.parents):
        if (parent / "dvc.yaml").exists() or (parent / ".git").exists():
            return parent
    return here


def tracking_uri(configured: str | None = None, root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the configured URI, else sqlite:///<project root>/mlflow.db (absolute)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    return f"sqlite:///{(Path(root) if root else project_root()) / 'mlflow.db'}"


def artifact_root(root: str | Path | None = None) -> str:
    """Absolute artifact folder beside the store, so artifacts of temporary copies are not lost with them."""
    return ((Path(root) if root else project_root()) / "mlartifacts").as_uri()


def client_for(uri: str | None = None, experiment: str = "cfg-lab"):
    """(MlflowClient, experiment_id), creating the experiment with an absolute artifact location if needed."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return client, exp.experiment_id
    location = artifact_root() if uri.startswith("sqlite:") or uri.startswith("file:") else None
    try:
        return client, client.create_experiment(experiment, artifact_location=location)
    except Exception:  # another process created it in between
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def git_commit(root: str | Path | None = None) -> str:
    """HEAD of the project's git repository, with '-dirty' when tracked files differ; 'unknown' without git."""
    cwd = Path(root) if root else project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance_tags(stage: str, params_hash: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that trace a number to its code and settings: git commit, DVC stage, params hash, host, versions."""
    import torch

    tags = {
        "git_commit": git_commit(Path.cwd()),
        "dvc_stage": stage,
        "params_hash": params_hash,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def log_flat(
    client,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    step: int = 0,
) -> None:
    """Log params, metrics and tags in one batch (None and NaN metric values are skipped)."""
    import math
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(k, float(v), now, step)
            for k, v in (metrics or {}).items()
            if v is not None and math.isfinite(float(v))
        ],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists become their JSON-ish string."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_cell(client, exp_id: str, record, images, labels, classes: list[str], params_hash: str) -> str:
    """A cell run nested under its model's train run: the record's settings as params (options as one JSON
    dict each), its metrics, fingerprint tags and a sample grid (up to 8 uint8 samples of each class)."""
    import tempfile

    from cfg.data.images import class_by_w_tiles, save_grid

    fp = record.fingerprint_detail
    tags = provenance_tags(
        "evaluate",
        params_hash,
        {"run_kind": "cell", "fingerprint": record.fingerprint}
        | ({"mlflow.parentRunId": record.train_run_id} if record.train_run_id else {})
        | {f"fingerprint.{k}": v for k, v in fp.items()},
    )
    rid = client.create_run(exp_id, run_name=record.name, tags=tags).info.run_id
    per_class = {f"fid_class_{c}": v for c, v in (record.per_class_fid or {}).items()}
    log_flat(client, rid, params=record.params(), metrics=record.metrics | per_class)
    n_classes = len(classes)
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, min(8, len(labels) // n_classes))
        tiles = class_by_w_tiles(images[None, : n_classes * per], labels[: n_classes * per], n_classes, per)
        path = Path(tmp) / "samples.png"
        save_grid(
            path, tiles[:, 0].view(n_classes, per, *tiles.shape[2:]), upscale=max(1, 64 // images.shape[-1])
        )
        client.log_artifact(rid, str(path))
    client.set_terminated(rid)
    return rid


def log_report(
    client, exp_id: str, summary: dict, params_hash: str, plots: Path, table: Path, report: Path
) -> str:
    """The report run: the summary's numbers as metrics, the figures, the table and report.md."""
    rid = client.create_run(
        exp_id, run_name="report", tags=provenance_tags("report", params_hash, {"run_kind": "report"})
    ).info.run_id
    log_flat(client, rid, metrics={k: v for k, v in summary.items() if isinstance(v, float)})
    for f in sorted(plots.glob("*.png")):
        client.log_artifact(rid, str(f), "plots")
    client.log_artifact(rid, str(table))
    client.log_artifact(rid, str(report))
    client.set_terminated(rid)
    return rid


def main(argv: list[str] | None = None) -> None:
    """`python -m cfg.study.tracking ui`: the MLflow UI on localhost against the project's store."""
    parser = argparse.ArgumentParser(prog="python -m cfg.study.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="start the MLflow UI on localhost")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    sub.add_parser("uri", help="print the tracking URI in use")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    if args.command == "uri":
        print(uri)
        return
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri})", flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
