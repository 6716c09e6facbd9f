"""Frontiers and curve shapes of one study: FID (lower is better) against IS (higher is better), per p_uncond.

Pure numpy / pandas; every function that sets rows side by side first refuses mixed metric fingerprints
(`analysis.selection.require_comparable`) and several rows of one (p_uncond, w), as a study of several guidance
methods has: pass one method's rows (`analysis.selection.method_rows`). A cell without FID or IS (a failed metric:
NaN) is no point of any front, never a curve's best, and is named (`fid_missing_w`, `is_missing_w`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.selection import guidance_methods, require_comparable
from cfg.study.frontier import (  # one implementation: the report's
    hypervolume,
    hypervolume_shares,
    pareto_mask,
)

__all__ = ["curve_shapes", "frontier_fid", "frontiers", "hypervolume", "pareto_mask", "rank_frontiers"]


def _curves(df: pd.DataFrame, by: str) -> pd.DataFrame:
    require_comparable(df)
    dup = df.duplicated([by, "w"])
    if dup.any():
        methods = list(dict.fromkeys(guidance_methods(df)))
        example = f"several rows for the same ({by}, w), e.g. {df.loc[dup, [by, 'w']].iloc[0].tolist()}"
        if len(methods) > 1:
            raise ValueError(
                f"{example}: the study has {len(methods)} guidance methods ({', '.join(methods)}); pass one "
                "method's curves, method_rows(df, 'cfg'), or compare the methods with compare_methods(df)"
            )
        raise ValueError(f"{example}: pick one study first with select(df, ...)")
    return df.sort_values([by, "w"]).reset_index(drop=True)


def frontiers(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """`df` (one study) with a `pareto` column: whether the cell is on its `by` curve's FID-vs-IS frontier."""
    out = _curves(df, by)
    out["pareto"] = False
    for _, g in out[measured(out)].groupby(by):
        out.loc[g.index, "pareto"] = pareto_mask(g["fid"].to_numpy(), g["is"].to_numpy())
    return out


def measured(df: pd.DataFrame) -> pd.Series:
    """Rows with both FID and IS (a failed metric leaves NaN): the only ones a front or a ranking can hold."""
    return df["fid"].notna() & df["is"].notna()


def frontier_fid(front_fid: np.ndarray, front_is: np.ndarray, is_lo: float, is_hi: float) -> float:
    """Mean FID of a Pareto front, linearly interpolated in IS, over [is_lo, is_hi] (NaN outside its span)."""
    order = np.argsort(front_is)
    xs, ys = np.asarray(front_is, float)[order], np.asarray(front_fid, float)[order]
    if not (is_lo < is_hi) or is_lo < xs[0] - 1e-12 or is_hi > xs[-1] + 1e-12:
        return np.nan
    grid = np.linspace(is_lo, is_hi, 257)
    return float(np.interp(grid, xs, ys).mean())


def rank_frontiers(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """Each `by` curve's FID-vs-IS Pareto front and how it ranks against the others.

    Columns: n_w, n_pareto, pareto_w; `frontier_fid`, the front's mean FID at equal IS over the IS range that
    every front spans (lower: better trade-off; NaN when the fronts share no IS range); `hypervolume`, the area
    the front dominates up to the reference point (`cfg.study.frontier.reference_point` of all curves' cells, as
    the methods report and `analysis.findings` measure it) as a share of the box between that point and the best
    values (higher: better; coarse on sparse grids);
    `dominated_share`, the share of its Pareto points that another curve's front dominates; `rank` (1 = best),
    by frontier_fid, or by hypervolume where the fronts share no IS range.
    """
    f = frontiers(df, by)
    # the methods report's reference point (cfg.study.frontier.reference_point): 1 / (n_w - 1) of the span beyond
    # the nadir of all curves' joint front, so that cells far behind every front do not set the box
    n_w = int(f.groupby(by).size().max())
    ok = f[measured(f)]
    shares = (
        hypervolume_shares(ok["fid"].to_numpy(), ok["is"].to_numpy(), ok[by].to_numpy(), n_w)[0]
        if not ok.empty
        else {}
    )
    front = f[f["pareto"]]
    spans = front.groupby(by)["is"].agg(["min", "max"])
    is_lo, is_hi = spans["min"].max(), spans["max"].min()
    rows = {}
    for key, g in f.groupby(by):
        mine = g[g["pareto"]]
        others = front[front[by] != key]
        dominated = [
            bool(
                (
                    (others["fid"] <= r["fid"])
                    & (others["is"] >= r["is"])
                    & ((others["fid"] < r["fid"]) | (others["is"] > r["is"]))
                ).any()
            )
            for _, r in mine.iterrows()
        ]
        rows[key] = {
            "n_w": len(g),
            "n_pareto": len(mine),
            "pareto_w": mine["w"].tolist(),
            "frontier_fid": frontier_fid(mine["fid"].to_numpy(), mine["is"].to_numpy(), is_lo, is_hi),
            "hypervolume": shares.get(key, np.nan),
            "dominated_share": float(np.mean(dominated)) if dominated else np.nan,
        }
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)
    # ties within rounding are ties
    if out["frontier_fid"].notna().all() and len(out) > 1:
        rank = out["frontier_fid"].round(9).rank(method="min")
    else:
        rank = out["hypervolume"].round(9).rank(ascending=False, method="min")
    out["rank"] = rank.astype("Int64") if rank.notna().all() else pd.array([pd.NA] * len(out), dtype="Int64")
    out.attrs["is_range"] = (is_lo, is_hi)
    return out


def curve_shapes(df: pd.DataFrame, by: str = "p_uncond") -> pd.DataFrame:
    """Per `by` curve: where FID is lowest and whether the minimum lies inside the w grid with FID falling
    before and rising after it (U shape), how far the best FID is from the next best in units of its
    uncertainty (fid_range_std), whether IS rises monotonically with w (and where it falls), and the frontier
    columns of `rank_frontiers`. Cells whose FID (IS) is missing are left out of FID's (IS's) columns and listed
    in `fid_missing_w` (`is_missing_w`); a curve with no FID at all has NaN there."""
    rows = {}
    for key, g in _curves(df, by).groupby(by):
        has_fid, has_is = g["fid"].notna().to_numpy(), g["is"].notna().to_numpy()
        w_all = g["w"].to_numpy()
        row = {
            "w_grid": w_all.tolist(),
            "fid_missing_w": w_all[~has_fid].tolist(),
            "is_missing_w": w_all[~has_is].tolist(),
        }
        f = g[has_fid]
        fid, w = f["fid"].to_numpy(), f["w"].to_numpy()
        if len(fid):
            k = int(np.argmin(fid))
            second = np.sort(fid)[1] if len(fid) > 1 else np.nan
            sd = f["fid_range_std"].iloc[k] if "fid_range_std" in f else np.nan
            row |= {
                "best_fid": fid[k],
                "best_fid_w": w[k],
                "fid_min_inside": 0 < k < len(w) - 1,
                "fid_u_shaped": bool(
                    0 < k < len(w) - 1
                    and np.all(np.diff(fid[: k + 1]) <= 0)
                    and np.all(np.diff(fid[k:]) >= 0)
                ),
                "best_fid_margin_sd": (second - fid[k]) / sd if sd and sd > 0 else np.nan,
            }
        else:
            row |= {
                "best_fid": np.nan,
                "best_fid_w": np.nan,
                "fid_min_inside": False,
                "fid_u_shaped": False,
                "best_fid_margin_sd": np.nan,
            }
        i = g[has_is]
        is_, wi = i["is"].to_numpy(), i["w"].to_numpy()
        drops = [f"{wi[j]:g}->{wi[j + 1]:g}" for j in range(len(wi) - 1) if is_[j + 1] < is_[j]]
        row |= {
            "max_is": is_.max() if len(is_) else np.nan,
            "max_is_w": wi[int(np.argmax(is_))] if len(is_) else np.nan,
            "is_monotonic": bool(len(is_)) and not drops,
            "is_drops": ", ".join(drops),
        }
        rows[key] = row
    shapes = pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)
    return shapes.join(rank_frontiers(df, by))
