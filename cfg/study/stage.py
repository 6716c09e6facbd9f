"""Small helpers shared by the stage scripts in pipelines/: parameters, paths, extractors (progress lines:
`cfg.progress`)."""

from __future__ import annotations

import sys
from pathlib import Path

from cfg.study.config import Params, ParamsError, load_params
from cfg.study.store import project_root


def stage_params(path: str | Path = "params.yaml") -> Params:
    """Validated params, or exit(2) with the one-line error before any expensive work starts."""
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def data_root(root: str | None) -> str | None:
    """A relative data root is taken from the project root (also inside DVC's temporary experiment copies)."""
    if root is None or Path(root).is_absolute():
        return root
    return str((project_root() / root).resolve())


def make_extractor(name: str, classifier_path: str | Path, inception_weights: str | None, device):
    """`cfg.eval.features.extractor_by_name` with a relative weights path taken from the project root."""
    from cfg.eval.features import extractor_by_name

    return extractor_by_name(name, classifier_path, data_root(inception_weights), device)
