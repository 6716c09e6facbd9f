"""Ho & Salimans (2022) Table 1 and our curves' shape beside it.

The paper's numbers (ImageNet 64x64, Inception features) are compared on shape only (where the FID minimum
falls, whether IS rises with w, how the p_uncond values rank), never on values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.columns import tidy_options
from analysis.frontiers import curve_shapes
from cfg.study.records import options_json

DATA = Path(__file__).resolve().parent / "data"


def paper_table1() -> pd.DataFrame:
    """Ho & Salimans (2022) Table 1, ImageNet 64x64: FID and IS per (p_uncond, w), one fingerprint of its own."""
    t = pd.read_csv(DATA / "cfg_paper_table1.csv").assign(
        guidance="cfg",
        guidance_options=options_json({}),
        sampler="ancestral",
        sampler_options=options_json({"v": 0.3}),
        fingerprint="paper-table1",
        source="paper",
    )
    return tidy_options(t)


def _on_grid(df: pd.DataFrame, w: list[float]) -> pd.DataFrame:
    return df[np.isclose(df["w"].to_numpy()[:, None], np.asarray(w)[None, :]).any(axis=1)]


def compare_to_paper(df: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our curves' shape beside the paper's, per p_uncond, both on the w values the two grids share (our whole
    grid when fewer than two are shared): best-FID w, U shape, IS monotonicity and frontier rank
    (the paper ranked among our p_uncond values when it has them). attrs: shared_w, rank_agreement (Kendall tau
    of the two rankings over the p_uncond both have)."""
    paper = paper_table1() if paper is None else paper
    shared = sorted(w for w in df["w"].unique() if np.isclose(paper["w"].to_numpy(), w).any())
    grid = shared if len(shared) >= 2 else sorted(df["w"].unique())
    ours = curve_shapes(_on_grid(df, grid))
    common_p = sorted(p for p in df["p_uncond"].unique() if np.isclose(paper["p_uncond"], p).any())
    paper_p = paper[paper["p_uncond"].isin(common_p)] if len(common_p) >= 2 else paper
    theirs = curve_shapes(_on_grid(paper_p, grid) if len(shared) >= 2 else paper_p)
    cols = ["best_fid_w", "fid_min_inside", "fid_u_shaped", "is_monotonic", "rank"]
    out = ours[cols].add_suffix("_ours").join(theirs[cols].add_suffix("_paper"), how="outer")
    out = out[[f"{c}_{s}" for c in cols for s in ("ours", "paper")]]
    both = out[["rank_ours", "rank_paper"]].dropna().astype(float)
    tau = both["rank_ours"].corr(both["rank_paper"], method="kendall") if len(both) >= 2 else np.nan
    out.attrs = {
        "shared_w": [float(w) for w in shared],
        "grid_w": [float(w) for w in grid],
        "rank_agreement": float(tau),
    }
    return out
