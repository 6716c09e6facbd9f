"""Comparability and selection: which rows of the tidy run table make one study.

Loading labels, comparing refuses. Every row carries its metric fingerprint key (`fingerprint`; its fields as
`fingerprint.<field>` where known), so a store that holds runs made with several extractors or sample counts
loads whole and `fingerprint_groups` lists them. Every function that sets numbers of different rows side by
side (frontiers, ranking, curve shapes, the narrative) first calls `require_comparable`, which raises
`cfg.eval.fingerprint.FingerprintMismatch` for mixed fingerprints: pick one with `select(df, fingerprint=...)`,
or loop over `df.groupby("fingerprint")`.
"""

from __future__ import annotations

import pandas as pd

from analysis.columns import FINGERPRINT_FIELDS
from cfg.eval.fingerprint import FingerprintMismatch, check_comparable
from cfg.study.records import CELL_KEY


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
    of each cell (its settings, `cfg.study.records.CELL_KEY`) is kept.
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
    cell = [c for c in CELL_KEY if c in df]
    return (
        df.sort_values("start_time", na_position="first")
        .drop_duplicates(cell, keep="last")
        .sort_values(["p_uncond", "w"])
        .reset_index(drop=True)
    )
