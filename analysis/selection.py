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
from cfg.study.report import method_column

PAPER_METHOD = "cfg"  # Ho & Salimans' guidance, without options: the method the paper's Table 1 measured


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
    which: str = "workspace",  # 'workspace', 'latest', a DVC experiment's name (exact) or a revision (hash prefix)
    *,
    fingerprint: str | None = None,  # keep only rows with this fingerprint key first
) -> pd.DataFrame:
    """The cells of one study, one row per (p_uncond, w) of each guidance method.

    'workspace': the rows of the workspace's trade-off table (what the report shows), else 'latest';
    'latest': the newest evaluate batch, i.e. the rows sharing the newest row's fingerprint, parameters hash and
    commit; otherwise the rows of the DVC experiment named `which` (the whole name: `wide` is not `wide-w`), else
    of the revision whose hash starts with `which` (refused, naming the candidates, when several do). Within the
    choice the newest row of each cell (its settings, `cfg.study.records.CELL_KEY`) is kept, so a study of
    several guidance methods keeps one row per (p_uncond, w, method): `method_rows` picks one method's curves.
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
    return _newest_per_cell(df[_rows_of(df, which)])


def _names(df: pd.DataFrame, col: str) -> pd.Series:
    """Each row's names in `col` ('dvc_exps' or 'dvc_revs', comma-separated), as lists."""
    if col not in df:
        return pd.Series([[] for _ in range(len(df))], index=df.index, dtype=object)
    return df[col].fillna("").map(lambda s: [n for n in s.split(", ") if n])


def _rows_of(df: pd.DataFrame, which: str) -> pd.Series:
    """The rows of the DVC experiment named `which` exactly (`wide` is not `wide-w`), or of the revision whose
    full hash is `which` or the only one that starts with it; an ambiguous prefix is refused naming the
    candidates."""
    exps, revs = _names(df, "dvc_exps"), _names(df, "dvc_revs")
    hits = exps.map(lambda ns: which in ns) | revs.map(lambda ns: which in ns)
    if hits.any():
        return hits
    # a revision hash's prefix ('workspace' is a name, not a hash)
    candidates = sorted({n for ns in revs for n in ns if n != "workspace" and n.startswith(which)})
    if len(candidates) > 1:
        named: dict[str, set[str]] = {rev: set() for rev in candidates}
        for es, rs in zip(exps, revs, strict=True):  # a row's names pair with its revisions where they align
            for rev in named.keys() & set(rs):
                named[rev] |= {es[rs.index(rev)]} if len(es) == len(rs) else set(es)
        raise ValueError(
            f"revision prefix {which!r} is ambiguous: "
            + "; ".join(
                f"{rev} ({', '.join(sorted(ns)) or 'no experiment name'})" for rev, ns in named.items()
            )
            + "; give more of the hash or the experiment's name"
        )
    if not candidates:
        known = sorted({n for ns in exps for n in ns})
        raise ValueError(f"no rows of DVC experiment or revision {which!r}; known: {known}")
    return revs.map(lambda ns: candidates[0] in ns)


def _newest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    cell = [c for c in CELL_KEY if c in df]
    return (
        df.sort_values("start_time", na_position="first")
        .drop_duplicates(cell, keep="last")
        .sort_values(["p_uncond", "w"])
        .reset_index(drop=True)
    )


def guidance_methods(df: pd.DataFrame) -> pd.Series:
    """Each row's guidance method with its options, as the report and the methods report name them
    (`cfg.study.report.method_column`: `cfg`, `rescale phi=0.7`; `cfg` for a frame without a guidance column)."""
    return method_column(df)


def method_rows(df: pd.DataFrame, method: str | None = None) -> pd.DataFrame:
    """The rows of one guidance method (a `guidance_methods` name): the curves that frontiers, curve shapes, the
    paper comparison and the narrative read, one per p_uncond. None: the frame's only method, else `cfg` (the
    paper's method, as the report's headline numbers in the guidance-methods preset); a study of several methods
    without cfg must name one. attrs: `method` (the one picked) and `methods` (all of the frame's, in order)."""
    names = guidance_methods(df)
    present = list(dict.fromkeys(names))
    if method is None:
        method = present[0] if len(present) == 1 else PAPER_METHOD
        if method not in present:
            raise ValueError(
                f"{len(present)} guidance methods and no {PAPER_METHOD!r} among them ({', '.join(present)}): "
                "name one, method_rows(df, METHOD)"
            )
    if method not in present:
        raise ValueError(f"no rows of guidance method {method!r}; the frame has {present}")
    out = df[names == method].reset_index(drop=True)
    out.attrs = {**df.attrs, "method": method, "methods": present}
    return out
