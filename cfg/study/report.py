"""The trade-off table and summary of a study, from the evaluate stage's cell records (pure pandas)."""

from __future__ import annotations

import pandas as pd

from cfg.eval.metrics import CELL_METRICS, check_comparable

# leading columns of results/tradeoff.csv, in order; other record fields follow
TABLE_COLUMNS = [
    "p_uncond",
    "w",
    *CELL_METRICS,
    "n_samples",
    "n_per_range",
    "sampler",
    "steps",
    "v",
    "seed",
    "extractor",
    "checkpoint",
    "fingerprint",
    "mlflow_run_id",
]


def cells_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (p_uncond, w) cell, sorted; refuses cells whose metric fingerprints differ."""
    if not records:
        raise ValueError("no evaluated cells: run the evaluate stage first")
    check_comparable([r["fingerprint_detail"] for r in records])
    df = pd.DataFrame(
        [
            {
                k: v
                for k, v in r.items()
                if k not in ("fingerprint_detail", "fid_ranges", "is_ranges", "per_class_fid")
            }
            for r in records
        ]
    )
    cols = [c for c in TABLE_COLUMNS if c in df] + [c for c in df if c not in TABLE_COLUMNS]
    return df[cols].sort_values(["p_uncond", "w"]).reset_index(drop=True)


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
    """A GitHub-markdown table of the chosen columns (no tabulate dependency)."""
    columns = columns or [
        c for c in ["p_uncond", "w", "fid", "is", "kid", "precision", "recall", "class_acc"] if c in df
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, r in df[columns].iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
