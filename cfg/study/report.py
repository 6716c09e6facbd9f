"""The trade-off table, summary, figures and report.md of a study, from its cell records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cfg.eval.fingerprint import check_comparable
from cfg.eval.sanity import degenerate_cells, describe
from cfg.study.frontier import compare_methods, dominance_sentences
from cfg.study.records import CellRecord, guidance_name


def cells_frame(records: list[CellRecord]) -> pd.DataFrame:
    """One row per cell (`CellRecord.row`), sorted by p_uncond, guidance method (in the records' order) and w;
    refuses cells whose metric fingerprints differ."""
    if not records:
        raise ValueError("no evaluated cells: run the evaluate stage first")
    check_comparable([r.fingerprint_detail for r in records])
    order = list(dict.fromkeys(_method(r) for r in records))
    df = pd.DataFrame([r.row() for r in records])
    df["_method"] = [order.index(_method(r)) for r in records]
    return df.sort_values(["p_uncond", "_method", "w"]).drop(columns="_method").reset_index(drop=True)


def _method(r: CellRecord) -> str:
    return guidance_name(r.guidance, r.guidance_options)


def method_column(df: pd.DataFrame) -> pd.Series:
    """Each row's guidance method with its options (`guidance_name`: `cfg`, `rescale phi=0.7`), from the table's
    two columns (options as JSON text or a mapping; none: the defaults); `cfg` for a table without a guidance
    column (one written before methods were kept)."""
    import json

    if "guidance" not in df:
        return pd.Series("cfg", index=df.index, dtype=object)
    options = df["guidance_options"] if "guidance_options" in df else pd.Series(None, index=df.index)
    return pd.Series(
        [
            guidance_name(g, json.loads(o) if isinstance(o, str) else dict(o or {}))
            for g, o in zip(df["guidance"], options, strict=True)
        ],
        index=df.index,
        dtype=object,
    )


def summary(df: pd.DataFrame) -> dict:
    """Best FID with its w and p_uncond, the largest IS, and whether IS rises with w for every p_uncond."""
    best = df.loc[df["fid"].idxmin()]
    top = df.loc[df["is"].idxmax()]
    rising = {
        f"{p:g}": bool(g.sort_values("w")["is"].is_monotonic_increasing) for p, g in df.groupby("p_uncond")
    }
    return {
        "best_fid": float(best["fid"]),
        "best_fid_w": float(best["w"]),
        "best_fid_p_uncond": float(best["p_uncond"]),
        "max_is": float(top["is"]),
        "max_is_w": float(top["w"]),
        "max_is_p_uncond": float(top["p_uncond"]),
        "is_rises_with_w": all(rising.values()),
        "is_rises_with_w_by_p_uncond": rising,
        "n_cells": int(len(df)),
        "n_samples": int(df["n_samples"].iloc[0]),
        "fingerprint": str(df["fingerprint"].iloc[0]),
    }


def markdown_table(df: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> str:
    """A GitHub-markdown table of the chosen columns (no tabulate dependency): integers as integers, the grid
    settings (SETTINGS) as written in params.yaml, other floats with `digits` decimals."""
    columns = columns or [
        c for c in ["p_uncond", "w", "fid", "is", "kid_x1e3", "precision", "recall", "class_acc"] if c in df
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    # column by column (itertuples), so that an int column stays int: iterrows casts a row to one float dtype
    for row in df[columns].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(c, v, digits) for c, v in zip(columns, row, strict=True)) + " |")
    return "\n".join(lines)


SETTINGS = ("p_uncond", "w")  # grid values: 0.1 and -1, not 0.100 and -1.000


def _cell(column: str, value, digits: int) -> str:
    if isinstance(value, bool | np.bool_) or not isinstance(value, float | np.floating):
        return str(value)
    if column in SETTINGS or value.is_integer() and column.startswith("n_"):
        return f"{value:g}"
    return f"{value:.{digits}f}"


# columns of report.md's table, those present and not all empty
REPORT_COLUMNS = [
    "p_uncond",
    "w",
    "fid",
    "fid_range_std",
    "is",
    "is_range_std",
    "kid_x1e3",
    "precision",
    "recall",
    "class_acc",
    "n_samples",
]


def column_notes(df: pd.DataFrame) -> list[str]:
    """What the table's less obvious columns are: the KID scale and the seed-range spreads."""
    notes = []
    if "kid_x1e3" in df:
        notes.append(
            "`kid_x1e3`: KID × 10³, as published KIDs are scaled (unbiased MMD², kernel (x·y/d + 1)³, "
            f"`cfg.eval.metrics.kid`) on the `{df['extractor'].iloc[0]}` features. The kernel cubes the "
            "feature scale: on the evaluation classifier's features KID is far larger than an Inception KID and "
            "compares only within one metric fingerprint. Below 0: within its noise (`kid_x1e3_std`) of 0."
        )
    if "fid_range_std" in df and "n_per_range" in df and df["n_per_range"].notna().any():
        n, per = int(df["n_samples"].iloc[0]), int(df["n_per_range"].iloc[0])
        notes.append(
            f"`fid_range_std`, `is_range_std`: sd of FID and IS over {n // per} disjoint seed ranges of {per} "
            "samples (independent noise), the seed-to-seed spread of a cell."
        )
    return [*(f"- {n}" for n in notes), ""] if notes else []


def report_markdown(
    df: pd.DataFrame,
    summ: dict,
    records: list[CellRecord],
    *,
    data_name: str,  # params.yaml data.name
    experiment: str,  # MLflow experiment
    grids: list[tuple[float, str]],  # (p_uncond, file name of its sample-grid figure)
    plots_rel: str | Path,  # the figures' folder as report.md links it
    methods: pd.DataFrame
    | None = None,  # compare_methods(records) when the study has several guidance methods
) -> str:
    """results/report.md: a warning banner over degenerate cells (`summ["degenerate_cells"]`) if any, headline
    numbers (of the first guidance method), the trade-off figure and table, the guidance methods' frontiers
    (several methods), samples, per-class FID, provenance."""
    first = df.iloc[0]
    p_values = sorted(df["p_uncond"].unique().tolist())
    w_values = sorted(df["w"].unique().tolist())
    warning = describe(summ.get("degenerate_cells", []), len(df))
    banner = [f"> **Warning:** {warning[0]}", ">", *(f"> - {c}" for c in warning[1:]), ""] if warning else []
    lines = [
        *banner,
        "# Classifier-free guidance: FID / IS trade-off",
        "",
        f"Data `{data_name}`, p_uncond ∈ {p_values}, w ∈ {w_values}; sampler "
        f"`{first['sampler']}` {first['sampler_options']} with {first['steps']} steps, {summ['n_samples']} samples "
        f"per cell; features from `{first['extractor']}` (evaluation classifier test accuracy "
        f"{summ['classifier_test_accuracy']:.4f}).",
        "",
        *(
            [f"Headline numbers of guidance `{summ['guidance']}`; every method: below."]
            if "guidance" in summ
            else []
        ),
        f"- Best FID **{summ['best_fid']:.3f}** at w = {summ['best_fid_w']:g}, p_uncond = {summ['best_fid_p_uncond']:g}.",
        f"- Largest IS **{summ['max_is']:.3f}** at w = {summ['max_is_w']:g}, p_uncond = {summ['max_is_p_uncond']:g}.",
        f"- IS rises monotonically with w for every p_uncond: **{summ['is_rises_with_w']}** "
        f"({', '.join(f'{k}: {v}' for k, v in summ['is_rises_with_w_by_p_uncond'].items())}).",
        "",
        f"![trade-off]({plots_rel}/tradeoff.png)",
        "",
        "## Trade-off table",
        "",
        markdown_table(
            df if methods is None else df.assign(guidance=method_column(df)),
            [c for c in _report_columns(methods is not None) if c in df and df[c].notna().any()],
        ),
        "",
        *column_notes(df),
        *_methods_section(methods, plots_rel),
        "## Samples",
        "",
    ]
    lines += [f"![p_uncond={p:g}]({plots_rel}/{name})" for p, name in grids]
    per_class = [r for r in records if r.per_class_fid]
    if per_class:
        lines += ["", "## Per-class FID", ""]
        for r in per_class:
            lines.append(
                f"- p_uncond={r.p_uncond:g}, w={r.w:g}{'' if methods is None else ', ' + _method(r)}: "
                + ", ".join(f"{c}: {v:.2f}" for c, v in r.per_class_fid.items())
            )
    lines += [
        "",
        "## Provenance",
        "",
        f"- metric fingerprint `{summ['fingerprint']}` (extractor, weights hash, reference statistics, sample count, "
        "resolution, resize): every row of the table shares it",
        f"- MLflow experiment `{experiment}`: one run per trained model with one nested run per "
        "cell (`mlflow_run_id` column), tagged with the git commit, DVC stage and parameters hash",
        f"- checkpoints: {', '.join(sorted(df['checkpoint'].unique()))}",
        "",
    ]
    return "\n".join(lines)


def _report_columns(several_methods: bool) -> list[str]:
    # the guidance method (with its options) after w when the study has several
    cols = list(REPORT_COLUMNS)
    return cols[:2] + ["guidance"] + cols[2:] if several_methods else cols


def _methods_section(methods: pd.DataFrame | None, plots_rel: str | Path) -> list[str]:
    """The guidance methods compared on one protocol: the same model, w grid and noise for every method."""
    if methods is None:
        return []
    table = methods.copy()
    for col in ("pareto_w", "degenerate_w"):
        table[col] = [", ".join(f"{w:g}" for w in ws) for ws in table[col]]
    cols = ["p_uncond", "method", "best_fid", "best_fid_sd", "best_fid_w", "hypervolume", "hypervolume_sd"]
    cols += ["pareto_w", "degenerate_w", "dominates", "dominated_by"]
    refs = methods.drop_duplicates("p_uncond")
    return [
        "## Guidance methods",
        "",
        "Every method sampled the same examples from the same noise with the same model and w grid. "
        "`hypervolume`: the share of the (IS, FID) box that a method's cells dominate, between the ideal point "
        "(lowest FID, highest IS of all methods of that model) and a reference point 1 / (number of w - 1) of "
        "the span beyond the nadir of all methods' joint Pareto front (highest FID and lowest IS on it; "
        "`cfg.study.frontier.reference_point`), so only cells near the best trade-offs count (higher: a better "
        "trade-off; 0: no cell comes near the joint front); `_sd`: its sd over disjoint seed ranges, each "
        "compared on its own; `degenerate_w`: cells near chance or no better than noise (the banner above), "
        "left out of the method's columns and of the reference point; `dominates`: the methods each of whose "
        "cells one of its cells dominates. Reference point: "
        + "; ".join(
            f"p_uncond={r['p_uncond']:g}: FID {r['ref_fid']:.3f}, IS {r['ref_is']:.3f}"
            for _, r in refs.iterrows()
        )
        + ".",
        "",
        f"![methods]({plots_rel}/methods.png)",
        "",
        markdown_table(table, [c for c in cols if c in table]),
        "",
        *(f"- {line}" for line in dominance_sentences(methods, methods["method"].iloc[0])),
        "",
    ]


def _json(value) -> float | None:
    # a number for metrics.json: NaN (a method with no sound cell) and a missing sd as null
    return None if value is None or pd.isna(value) else float(value)


def write_report(
    records: list[CellRecord],
    *,
    grid_images: dict[float, Path],  # p_uncond -> its sample stage's grid.png
    classifier_accuracy: float,  # the classifier stage's test accuracy
    data_name: str,
    experiment: str,
    table: Path,  # results/tradeoff.csv
    metrics: Path,  # results/metrics.json (DVC metrics)
    plots: Path,  # results/plots/
    report: Path,  # results/report.md
) -> tuple[pd.DataFrame, dict]:
    """The report stage's outputs from the study's records; returns (table, summary)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from cfg.io import atomic_write, atomic_write_text, write_json
    from cfg.study.plots import methods_figure, sample_grid, tradeoff_figure

    df = cells_frame(records)
    atomic_write_text(table, df.to_csv(index=False))
    names = method_column(df)
    base = df[names == names.iloc[0]]  # the first guidance method (cfg by default): the headline numbers
    methods = compare_methods(records) if names.nunique() > 1 else None
    summ = summary(base) | {
        "classifier_test_accuracy": classifier_accuracy,
        "degenerate_cells": degenerate_cells(records),  # cfg.eval.sanity: near chance or no better than noise
    }
    if methods is not None:
        summ["guidance"] = names.iloc[0]
        summ["guidance_methods"] = {
            f"{r['method']} p_uncond={r['p_uncond']:g}": {
                k: _json(r[k])
                for k in (
                    "best_fid",
                    "best_fid_sd",
                    "best_fid_w",
                    "hypervolume",
                    "hypervolume_sd",
                    "ref_fid",
                    "ref_is",
                )
            }
            | {k: r[k] for k in ("degenerate_w", "dominates", "dominated_by")}
            for _, r in methods.iterrows()
        }
    write_json(metrics, summ)

    plots.mkdir(parents=True, exist_ok=True)
    fig = tradeoff_figure(base)
    atomic_write(plots / "tradeoff.png", lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    if methods is not None:
        fig = methods_figure(df.assign(method=names))
        atomic_write(plots / "methods.png", lambda f: fig.savefig(f, dpi=120, format="png"))
        plt.close(fig)
    grids = []
    for p, path in grid_images.items():
        image = np.asarray(Image.open(path))
        w_values = [r.w for r in records if r.p_uncond == p]  # the sample stage's rows: method-major
        n_w = len(w_values)
        fig, ax = plt.subplots(figsize=(1 + 0.6 * n_w, 0.5 + 0.6 * image.shape[0] / image.shape[1] * n_w))
        order = list(dict.fromkeys(_method(r) for r in records if r.p_uncond == p))
        sample_grid(
            ax,
            image,
            w_values,
            title=f"p_uncond={p:g}: one row per class, same noise in every column"
            + (f"; column groups: {', '.join(order)}" if len(order) > 1 else ""),
        )
        name = f"samples_p_uncond={p}.png"
        atomic_write(
            plots / name, lambda f, fig=fig: fig.savefig(f, dpi=120, bbox_inches="tight", format="png")
        )
        plt.close(fig)
        grids.append((p, name))
    rel = (
        plots.resolve().relative_to(report.parent.resolve())
        if plots.resolve().is_relative_to(report.parent.resolve())
        else plots
    )
    text = report_markdown(
        df,
        summ,
        records,
        data_name=data_name,
        experiment=experiment,
        grids=grids,
        plots_rel=rel,
        methods=methods,
    )
    atomic_write_text(report, text)
    return df, summ
