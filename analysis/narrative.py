"""The findings of one study in words: a short markdown account generated from its numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.frontiers import curve_shapes, rank_frontiers
from analysis.paper import compare_to_paper
from analysis.selection import guidance_methods


def _ps(values) -> str:
    return ", ".join(f"{v:g}" for v in values) or "none"


def _ranking(r: pd.DataFrame) -> str:
    by_front = r["frontier_fid"].notna().all() and len(r) > 1
    col, fmt = ("frontier_fid", ".4g") if by_front else ("hypervolume", ".2f")
    lo, hi = r.attrs.get("is_range", (np.nan, np.nan))
    how = (
        f"mean FID of each p_uncond's Pareto front at equal IS, over IS {lo:.4g} to {hi:.4g}"
        if by_front
        else "share of the FID-vs-IS box each p_uncond's Pareto front dominates"
    )
    tiers = [
        " = ".join(f"{p:g} ({v:{fmt}})" for p, v in g[col].items())
        for _, g in r.sort_values("rank").groupby("rank", sort=True)
    ]
    return f"{' > '.join(tiers)} ({how})"


def narrative(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> str:
    """A short markdown account of one study's curves (one guidance method: `analysis.selection.method_rows`),
    generated from its numbers: best FID and its w, cells whose metrics are missing, IS monotonicity, the p_uncond
    ranking by frontier, and how the curves' shape compares with the paper's Table 1."""
    shapes = curve_shapes(df)
    ranks = rank_frontiers(df)
    best = df.loc[df["fid"].idxmin()]
    n = f"{int(best['n_samples'])} samples each, " if pd.notna(best.get("n_samples")) else ""
    method = f"guidance `{guidance_methods(df).iloc[0]}`, " if "guidance" in df else ""
    lines = [
        f"- **Best FID {best['fid']:.4g}** at w = {best['w']:g}, p_uncond = {best['p_uncond']:g} "
        f"({len(df)} cells, {n}{method}fingerprint `{best['fingerprint']}`).",
    ]
    where = {
        p: "inside the grid, U-shaped"
        if s.fid_u_shaped
        else ("inside the grid, not U-shaped" if s.fid_min_inside else "at the edge of the grid")
        for p, s in shapes.iterrows()
    }
    lines.append(
        "- FID is lowest at "
        + "; ".join(f"w = {s.best_fid_w:g} for p_uncond {p:g} ({where[p]})" for p, s in shapes.iterrows())
        + "."
    )
    missing = [
        f"{m.upper()} at w = {_ps(s[f'{m}_missing_w'])} for p_uncond {p:g}"
        for p, s in shapes.iterrows()
        for m in ("fid", "is")
        if s[f"{m}_missing_w"]
    ]
    if missing:
        lines.append(f"- Missing (left out of the shapes and fronts): {'; '.join(missing)}.")
    margins = shapes["best_fid_margin_sd"].dropna()
    if not margins.empty:
        within = [p for p, m in margins.items() if m < 1]
        lines.append(
            "- The best w beats the next best by "
            + ", ".join(f"{m:.2g} sd for p_uncond {p:g}" for p, m in margins.items())
            + " (sd: fid_range_std, FID's spread over disjoint seed ranges): "
            + (f"within the noise for p_uncond {_ps(within)}." if within else "more than the noise.")
        )
    falling = shapes[~shapes["is_monotonic"]]
    drops = "; ".join(f"{p:g} (w {s.is_drops})" for p, s in falling.iterrows())
    if falling.empty:
        lines.append("- IS rises monotonically with w for every p_uncond.")
    elif len(falling) == len(shapes):
        lines.append(f"- IS does not rise monotonically with w for any p_uncond; it falls for {drops}.")
    else:
        rising = shapes.index[shapes["is_monotonic"]].tolist()
        lines.append(f"- IS rises monotonically with w for p_uncond {_ps(rising)}; it falls for {drops}.")
    lines.append(
        f"- Frontier ranking: {_ranking(ranks)}. Pareto-optimal w: "
        + "; ".join(f"{_ps(r.pareto_w)} for p_uncond {p:g}" for p, r in ranks.iterrows())
        + "."
    )
    cmp = compare_to_paper(df, paper)
    ours = cmp.dropna(subset=["best_fid_w_ours"])
    theirs = cmp.dropna(subset=["best_fid_w_paper"])
    same = [
        p
        for p, r in cmp.dropna(subset=["best_fid_w_ours", "best_fid_w_paper"]).iterrows()
        if np.isclose(r.best_fid_w_ours, r.best_fid_w_paper)
    ]
    tau = cmp.attrs["rank_agreement"]

    def which(col: pd.Series) -> str:
        yes = col.index[col.astype(bool)].tolist()
        return "all" if len(yes) == len(col) else ("none" if not yes else f"p_uncond {_ps(yes)}")

    def order(frame: pd.DataFrame, col: str) -> str:
        return " > ".join(" = ".join(f"{p:g}" for p in g.index) for _, g in frame.groupby(col, sort=True))

    def minima(frame: pd.DataFrame, col: str) -> str:
        return "; ".join(f"w = {w:g} for p_uncond {_ps(g.index)}" for w, g in frame.groupby(col))

    grids = (
        f"on the w values both grids have ({_ps(cmp.attrs['shared_w'])})"
        if len(cmp.attrs["shared_w"]) >= 2
        else "each on its own w grid (they share fewer than two w values)"
    )
    lines += [
        f"- Against the paper's Table 1 (ImageNet 64x64), {grids}:",
        f"  - FID minimum: paper {minima(theirs, 'best_fid_w_paper')}; ours {minima(ours, 'best_fid_w_ours')}"
        f" (the same w for {'p_uncond ' + _ps(same) if same else 'no p_uncond'}).",
        f"  - FID U-shaped in w (minimum inside the grid): paper {which(theirs['fid_u_shaped_paper'])}; "
        f"ours {which(ours['fid_u_shaped_ours'])}.",
        f"  - IS rising monotonically with w: paper {which(theirs['is_monotonic_paper'])}; "
        f"ours {which(ours['is_monotonic_ours'])}.",
        f"  - p_uncond ranked by frontier: paper {order(theirs, 'rank_paper')}; ours {order(ours, 'rank_ours')}"
        + (f" (Kendall tau {tau:+.2f})." if pd.notna(tau) else "."),
    ]
    return "\n".join(lines)
