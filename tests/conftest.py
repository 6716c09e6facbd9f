"""Shared fixtures: a temporary copy of the project with the real params.yaml shrunk to tiny sizes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# the real params.yaml with every size shrunk: the whole pipeline runs in about a minute on 2 CPU cores
TINY = {
    "data": {"max_train": 300, "max_test": 200},
    "classifier": {"epochs": 3, "width": 8, "feature_dim": 32},
    "model": {"base_width": 8, "head_channels": 8},
    "train": {"p_uncond": [0.1, 0.5], "steps": 30, "log_every": 10, "warmup_steps": 5},
    "guide": {"steps": 10},  # autoguidance's guide network, trained only where sample.guidance uses it
    "sample": {"w": [-1.0, 0.0, 1.0], "steps": 6, "n_samples": 40, "batch_size": 120},
    "evaluate": {
        "seed_ranges": 2,
        "metric_options": {"kid": {"subsets": 5, "subset_size": 20}, "precision_recall": {"k": 3}},
    },
}


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command with the test environment's Python first on PATH; output captured as text."""
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def up_to_date(status: str) -> bool:
    """Whether `dvc status` printed nothing out of date: the `inputs` stage alone, which is always changed (it hashes
    the files outside the repository on every repro, cfg/data/sources.py), or DVC's own "up to date"."""
    return status.split() in (["inputs:", "always", "changed"], "Data and pipelines are up to date.".split())


def shrink_params(path: Path, overrides: dict) -> None:
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC copy of the project (tracked and untracked, not ignored, files) with tiny params."""
    dest = tmp_path / "cfg-lab"
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    outputs = (
        "data/",
        "models/",
        "samples/",
        "results/",
        "mlartifacts/",
        "dvc.lock",
        "mlflow.db",
        "optuna.db",
    )
    for rel in files:
        if rel.startswith(outputs):  # pipeline outputs of the workspace, not part of the project
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shrink_params(dest / "params.yaml", TINY)
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], dest)
    return dest
