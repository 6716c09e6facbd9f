"""Did my run reproduce the committed one? Two trade-off tables cell by cell, each difference against the
spread of the cell over its seed ranges (`cfg-lab compare`).

Two runs of the same protocol (the same params.yaml, sampler, steps, seed, sample and seed-range counts,
extractor) compare even when their metric fingerprints differ: on another CPU the evaluation classifier trains
to slightly different weights (another fingerprint), and its FIDs move by far less than their seed-to-seed
spread. Cells whose protocol differs are refused, naming the fields.
"""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cfg.io import load_yaml
from cfg.study.records import ID_DTYPES, guidance_name
from cfg.study.report import method_column

# what makes two cells the same experiment; the fingerprint (the evaluation network's weights and reference
# statistics) may differ between machines and is reported, not required
PROTOCOL = (
    "sampler",
    "sampler_options",
    "steps",
    "seed",
    "n_samples",
    "n_per_range",
    "extractor",
)
# what names a cell: a study may run one guidance method with several option sets (sample.guidance entries such as
# rescale_07 and rescale_05), each its own row of the table
KEY = ("p_uncond", "w", "guidance", "guidance_options")
# metric -> the column holding its spread over seed ranges (None: reported without a verdict)
METRICS = {"fid": "fid_range_std", "is": "is_range_std", "kid_x1e3": None, "class_acc": None}
# params.yaml keys whose difference is no difference of protocol: where runs are logged, and how a stage runs
# (device, processes, compiled kernels, CUDA graph, cuDNN's algorithm choice, how often a resume state is written),
# which moves the numbers by rounding at most; with dropout, another number of train processes draws other masks,
# weights of the same distribution. Nor what a stage only logs (the loss's logging cadence, the training FID curve)
# or what the table does not come from (the hyper-parameter search). A run from before such a key existed compares
# too (None vs a value).
IGNORED_PARAMS = (
    "tracking",
    "search",
    "train.log_every",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_w",
    "train.device",
    "train.devices",
    "train.compile",
    "train.cuda_graph",
    "train.compile_update",
    "train.checkpoint_every",
    "sample.compile",
    "sample.cudnn_benchmark",
    "sample.devices",
)


class ProtocolMismatch(ValueError):
    """The two runs are not the same experiment; the message names what differs."""


@dataclass
class Source:
    """One side of a comparison: its trade-off table, its params.yaml (if known) and where they came from."""

    table: pd.DataFrame
    params: dict | None
    label: str


def load_source(ref: str, root: str | Path = ".", table: str = "results/tradeoff.csv") -> Source:
    """`ref` is a folder holding tradeoff.csv (or results/tradeoff.csv), a CSV file, or a git revision of the
    project at `root` (its committed results/tradeoff.csv and params.yaml)."""
    root = Path(root)
    path = Path(ref)
    if path.is_dir():
        for candidate in (path / "tradeoff.csv", path / table):
            if candidate.is_file():
                params = next(
                    (
                        p
                        for p in (path / "params.yaml", candidate.parent.parent / "params.yaml")
                        if p.is_file()
                    ),
                    None,
                )
                return Source(
                    pd.read_csv(candidate, dtype=ID_DTYPES),
                    load_yaml(params.read_text()) if params else None,
                    str(candidate),
                )
        raise FileNotFoundError(f"{ref}: no tradeoff.csv or {table} in this folder")
    if path.is_file():
        return Source(pd.read_csv(path, dtype=ID_DTYPES), None, str(path))

    def show(rel: str) -> str:
        out = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise FileNotFoundError(
                f"{ref!r} is neither a folder, a CSV file nor a git revision with {rel}: "
                + (out.stderr.strip().splitlines() or ["git show failed"])[-1]
            )
        return out.stdout

    params = load_yaml(show("params.yaml"))
    return Source(pd.read_csv(io.StringIO(show(table)), dtype=ID_DTYPES), params, f"{ref}:{table}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def params_difference(a: dict, b: dict) -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} of the params that differ, less IGNORED_PARAMS."""
    fa, fb = _flat(a), _flat(b)

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in IGNORED_PARAMS)

    return {
        k: (fa.get(k), fb.get(k))
        for k in sorted(set(fa) | set(fb))
        if not ignored(k) and fa.get(k) != fb.get(k)
    }


def compare(
    ref: Source,
    mine: Source,
    *,
    sigmas: float = 2.0,  # a difference within this many seed-range sds is a reproduction
) -> pd.DataFrame:
    """One row per (cell, metric): ref, mine, the difference, the seed-range sd (the larger of the two runs'),
    z = difference / sd and a verdict: 'identical', 'within noise' (|z| <= sigmas), 'differs', 'missing' (a
    number in one run only), or '-' for a metric without a spread. Raises ProtocolMismatch when the runs are not
    the same experiment."""
    if sigmas <= 0:
        raise ValueError(f"sigmas must be > 0 (seed-range sds a difference may span), got {sigmas}")
    if ref.params is not None and mine.params is not None:
        diff = params_difference(ref.params, mine.params)
        if diff:
            shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ProtocolMismatch(f"params.yaml differs ({ref.label} vs {mine.label}): {shown}")
    a, b = ref.table, mine.table
    key = [k for k in KEY if k in a and k in b]
    # several rows per cell, e.g. an older table without guidance_options of a study with two option sets
    for side, t in ((ref, a), (mine, b)):
        if t.duplicated(key).any():
            raise ProtocolMismatch(
                f"{side.label} has several rows per cell ({', '.join(key)}: the columns both tables have), so its "
                f"cells cannot be paired, e.g. {tuple(t.loc[t.duplicated(key), key].iloc[0])}"
            )
    cells_a, cells_b = (
        set(map(tuple, a[key].to_numpy().tolist())),
        set(map(tuple, b[key].to_numpy().tolist())),
    )
    if cells_a != cells_b:
        raise ProtocolMismatch(
            f"the runs have other cells ({', '.join(key)}): only in {ref.label}: {sorted(cells_a - cells_b)}; "
            f"only in {mine.label}: {sorted(cells_b - cells_a)}"
        )
    merged = a.merge(b, on=key, suffixes=("_ref", "_mine"))
    protocol = [c for c in PROTOCOL if c in a and c in b and c not in key]
    for c in protocol:
        x, y = merged[f"{c}_ref"], merged[f"{c}_mine"]
        bad = ~((x == y) | (x.isna() & y.isna()))
        if bad.any():
            r = merged[bad].iloc[0]
            raise ProtocolMismatch(
                f"{c} differs at {_cell(r, 'guidance_options' in r)}: {r[f'{c}_ref']!r} in {ref.label}, "
                f"{r[f'{c}_mine']!r} in {mine.label} (a different protocol, not a reproduction)"
            )
    rows = []
    for _, r in merged.iterrows():
        for metric, spread in METRICS.items():
            if f"{metric}_ref" not in r or f"{metric}_mine" not in r:
                continue
            x, y = float(r[f"{metric}_ref"]), float(r[f"{metric}_mine"])
            sd = (
                max(float(r[f"{spread}_ref"]), float(r[f"{spread}_mine"]))
                if spread and f"{spread}_ref" in r and f"{spread}_mine" in r
                else np.nan
            )
            z = (y - x) / sd if sd and sd > 0 else np.nan
            verdict = (
                "identical"
                if x == y
                else "missing"  # a number on one side only: the metric failed or was dropped in one run
                if np.isnan(x) != np.isnan(y)
                else "-"
                if np.isnan(z)
                else "within noise"
                if abs(z) <= sigmas
                else "differs"
            )
            rows.append(
                {
                    **{k: r[k] for k in key},
                    "metric": metric,
                    "ref": x,
                    "mine": y,
                    "diff": y - x,
                    "seed_sd": sd,
                    "z": z,
                    "verdict": verdict,
                }
            )
    out = pd.DataFrame(rows)
    weights = None  # cells whose weights both runs recorded, and of those the ones sampled from other weights
    if "weights" in a and "weights" in b:
        x, y = merged["weights_ref"], merged["weights_mine"]
        known = x.notna() & y.notna()
        weights = {"cells": len(merged), "known": int(known.sum()), "other": int((known & (x != y)).sum())}
    out.attrs.update(
        ref=ref.label,
        mine=mine.label,
        sigmas=sigmas,
        fingerprints=(sorted(set(a["fingerprint"])), sorted(set(b["fingerprint"])))
        if "fingerprint" in a
        else None,
        weights=weights,
    )
    return out


def _cell(r, several_methods: bool) -> str:
    """`p_uncond=0.1 w=3`, and the guidance method with its options when the table has several."""
    method = f" {guidance_name(r['guidance'], json.loads(r['guidance_options']))}" if several_methods else ""
    return f"p_uncond={r['p_uncond']:g} w={r['w']:g}{method}"


def verdict(result: pd.DataFrame) -> tuple[bool, str]:
    """(reproduced, one paragraph): every judged metric identical or within noise, and no metric missing in one
    run."""
    several = "guidance" in result and "guidance_options" in result
    several = several and len(result[["guidance", "guidance_options"]].drop_duplicates()) > 1
    judged = result[result["metric"].map(lambda m: METRICS.get(m) is not None)]  # those with a spread
    # only a metric with a spread can differ; any metric can be missing (a number in one run only)
    bad = result[result["verdict"].isin(["differs", "missing"])]
    same = (judged["verdict"] == "identical").sum()
    worst = judged.loc[judged["z"].abs().idxmax()] if judged["z"].notna().any() else None
    lines = [
        f"{len(judged)} cell metrics judged ({', '.join(sorted(judged['metric'].unique()))}): {same} identical, "
        f"{(judged['verdict'] == 'within noise').sum()} within {result.attrs['sigmas']:g} seed-range sd, "
        f"{(judged['verdict'] == 'differs').sum()} differ."
        + (f" {n} cell metrics missing in one run." if (n := (result["verdict"] == "missing").sum()) else "")
    ]
    if worst is not None:
        lines.append(
            f"Largest |z| {abs(worst['z']):.2f}: {worst['metric']} at {_cell(worst, several)} "
            f"({worst['ref']:.4g} -> {worst['mine']:.4g}, seed sd {worst['seed_sd']:.3g})."
        )
    fps = result.attrs.get("fingerprints")
    if fps and fps[0] != fps[1]:
        lines.append(
            f"Metric fingerprints differ ({', '.join(fps[0])} vs {', '.join(fps[1])}): another evaluation "
            "classifier or reference statistics (e.g. another CPU), so the numbers are compared as one protocol "
            "measured by two networks, not byte for byte."
        )
    weights = result.attrs.get("weights")
    if weights and weights["other"]:
        lines.append(
            f"The runs sampled other weights in {weights['other']} of {weights['cells']} cells (their weights "
            "hashes differ: another training, e.g. on a GPU, whose training is not bitwise repeatable): a seed-range "
            "sd is one model's sampling noise, not the spread between trainings, so a cell beyond it may be that "
            "spread; judge the findings over several trainings (python -m analysis.findings run0/ run1/ ...)."
        )
    elif weights and weights["cells"] and weights["known"] == weights["cells"]:
        lines.append(
            "The same weights in every cell (equal weights hashes): the differences are sampling and evaluation alone."
        )
    else:
        lines.append(
            "Whether the runs sampled the same weights is not recorded in every cell (a run from before the "
            "weights column, or cells without it)."
        )
    ok = bad.empty
    lines.append(
        "REPRODUCED"
        if ok
        else "NOT REPRODUCED: "
        + ", ".join(
            f"{r['metric']} {_cell(r, several)} "
            + (
                f"(z {r['z']:+.1f})"
                if r["verdict"] == "differs"
                else f"(missing in {'mine' if np.isnan(r['mine']) else 'ref'})"
            )
            for _, r in bad.head(8).iterrows()
        )
    )
    return ok, " ".join(lines)


def format_table(result: pd.DataFrame, metrics: tuple[str, ...] = ("fid", "is")) -> str:
    """The per-cell table of the judged metrics, one line per cell and metric."""
    shown = result[result["metric"].isin(metrics)].copy()
    for c, fmt in (
        ("ref", "{:.4f}"),
        ("mine", "{:.4f}"),
        ("diff", "{:+.4f}"),
        ("seed_sd", "{:.3f}"),
        ("z", "{:+.2f}"),
    ):
        shown[c] = shown[c].map(lambda v, fmt=fmt: "" if pd.isna(v) else fmt.format(v))
    shown["p_uncond"] = shown["p_uncond"].map("{:g}".format)
    shown["w"] = shown["w"].map("{:g}".format)
    if "guidance" in shown and "guidance_options" in shown:  # one column: the method with its options
        shown = shown.assign(guidance=method_column(shown)).drop(columns="guidance_options")
    return shown.to_string(index=False)
