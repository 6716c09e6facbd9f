"""Small helpers shared by the stage scripts in pipelines/: parameters, paths, extractors (progress lines:
`cfg.progress`)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import yaml

from cfg.study.config import Params, ParamsError, load_params
from cfg.study.store import data_root, project_root  # noqa: F401 - data_root: the stages' import of it


def stage_params(path: str | Path = "params.yaml") -> Params:
    """Validated params, or exit(2) with the one-line error before any expensive work starts."""
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def make_extractor(name: str, classifier_path: str | Path, inception_weights: str | None, device):
    """`cfg.eval.features.extractor_by_name` with a relative weights path taken from the project root."""
    from cfg.eval.features import extractor_by_name

    return extractor_by_name(name, classifier_path, data_root(inception_weights), device)


def stage_code(stage: str, root: str | Path) -> dict[str, str]:
    """{path: sha256 (16 hex digits)} of the Python files among `stage`'s deps in `root`/dvc.yaml (a foreach
    stage by its name, e.g. train): the code for whose change `dvc repro` reruns the stage. A resume state keeps
    it, so that an interrupted run is not continued by other code (cfg.engine.training.train_diffusion's `code`)."""
    root = Path(root)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"no stage {stage!r} in {root / 'dvc.yaml'}; its stages: {sorted(stages)}")
    deps = stages[stage].get("do", stages[stage])["deps"]
    return {
        dep: hashlib.sha256((root / dep).read_bytes()).hexdigest()[:16]
        for dep in sorted(deps)
        if dep.endswith(".py")
    }
