"""Small helpers shared by the stage scripts in pipelines/: parameters, paths, progress, atomic writes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
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


def fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_printer(label: str, unit: str, every_s: float = 5.0) -> Callable[[dict], None]:
    """A callback printing 'label: done/total unit, rate, ETA' at most every `every_s` seconds (and at the end)."""
    last = [0.0]

    def report(info: dict) -> None:
        done, total = info.get("done", 0), info.get("total", 0)
        now = time.perf_counter()
        if now - last[0] < every_s and done < total:
            return
        last[0] = now
        extra = "".join(f", {k} {v:.4g}" for k, v in info.items() if k in ("loss", "acc"))
        rate = f", {info['rate']:.0f} {unit}/s" if info.get("rate") else ""
        eta = f", ETA {fmt_seconds(info['eta_s'])}" if "eta_s" in info else ""
        print(f"[{label}] {done}/{total} {unit}{extra}{rate}{eta}", file=sys.stderr, flush=True)

    return report


def make_extractor(name: str, classifier_path: str | Path, inception_weights: str | None, device):
    """`cfg.eval.features.extractor_by_name` with a relative weights path taken from the project root."""
    from cfg.eval.features import extractor_by_name

    return extractor_by_name(name, classifier_path, data_root(inception_weights), device)
