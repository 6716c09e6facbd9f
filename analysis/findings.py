"""The paper's three findings checked against one study, with the seed spread deciding what counts.

Ho & Salimans (2022), Table 1 (ImageNet 64x64): (1) FID is U-shaped in w with its minimum at 0 < w <= 1,
(2) IS rises with w, (3) p_uncond = 0.1 and 0.2 have a better FID-vs-IS frontier than 0.5. `check_findings`
gives each finding, per p_uncond (the frontier once), one verdict: "reproduced", "not reproduced",
"inconclusive (within seed spread)", or "not testable" (a needed w or p_uncond is missing), with the numbers
behind it. It is a report, not a gate: the command line exits 0 whatever the verdicts.

    .venv/bin/python -m analysis.findings results/            # or a tradeoff.csv; --json out.json; --k 2
    .venv/bin/python -m analysis.findings run0/ run1/ run2/     # several trainings of one study (below)

Which cells. The cfg cells (guidance `cfg` without options) with w >= 0, the paper's range (w = -1, the
unconditional model, is left out of every finding), one row per (p_uncond, w) and one metric fingerprint. A cell
whose metric is missing (NaN: its FID or IS failed) is left out of the findings that need that metric and named
in their numbers ("FID missing at w = 0.5 (left out)"; `missing_w` in the detail): it is never a curve's best.

The spread. Every cell has FID and IS on all its N = R * n samples (`fid`, `is`: the estimates used below)
and on each of R disjoint example ranges of n samples (`fid_range_std`, `is_range_std`: the sd over ranges;
the values themselves in the cell records' `ranges`). The sampling sd of a metric on n samples scales about as
1 / sqrt(n), so the full-sample value's standard error is taken as s / sqrt(R), s the sd over ranges (FID is
also biased upwards at small n, which is why the range means sit above `fid`; the bias is nearly the same for
neighbouring cells and cancels in differences). The standard error of a difference between two cells a, b:
- paired, when the per-range values of both are known and R >= 3: sd over ranges of (a_r - b_r) / sqrt(R).
  Every w of a model is sampled from the same noise and scored on the same examples, so range r of a and
  range r of b share most of their noise and the paired sd is the honest one (on the Fashion-MNIST study it
  is about 10x smaller than the unpaired bound);
- unpaired otherwise: sqrt(s_a^2 + s_b^2) / sqrt(R). Treating the cells as independent ignores the shared
  noise, so this over-states the spread of a difference: verdicts lean to "inconclusive". With R = 2 it is
  used even when the ranges are known, since the sd of a paired difference then rests on one degree of
  freedom and can come out near 0 by chance (every sd with R = 2 does; read such verdicts as rough); finding
  (1)'s numbers then show the paired se beside it, "[paired, 1 df: ...]", for information only.
A difference d is "beyond the spread" when |d| > k * se (k = 2 by default, about a 95% two-sided band).

The rules.
(1) Per p_uncond, w* = argmin FID over the grid (w >= 0; w = 0 must be in it, else "not testable").
    If 0 < w* <= 1: "reproduced" when FID(0) - FID(w*) and FID(w_max) - FID(w*) (the two arms of the U, w_max
    the largest w) both exceed k * se; otherwise inconclusive. If w* = 0 or w* > 1: "not reproduced" when
    FID(w) - FID(w*) exceeds k * se for every w in (0, 1] (no w the paper's minimum could sit at comes
    within the spread; the numbers name the closest one); otherwise inconclusive.
(2) Per p_uncond, over the grid's consecutive w steps: "not reproduced" when IS falls beyond the spread on any
    step (each named); "reproduced" when it rises beyond the spread on every step, or when it rises on every
    step in the point estimates (Spearman correlation of IS with w = 1) and from the first w to the last
    beyond the spread; inconclusive otherwise. Dips within the spread are listed too.
(3) Hypervolume of each of p_uncond 0.1, 0.2, 0.5's FID-vs-IS Pareto fronts, as the methods report measures
    a guidance method's (`cfg.study.frontier`, each p_uncond's curve in place of a method): the area the front
    dominates up to a common reference point as a share of the box between it and the ideal point (the lowest
    FID, the highest IS; higher: better). The reference point is `cfg.study.frontier.reference_point` of the
    three curves' cells: 1 / (n_w - 1) of the span beyond the nadir of their joint Pareto front (n_w: the w per
    curve), so that cells far behind every front do not set the box (on the Fashion-MNIST study the worst FID,
    67 at w = 4, sits on the joint front with the highest IS, so there the box only shrinks by that 1 / (n_w - 1)).
    Degenerate cells (`cfg.study.frontier.degenerate_rows`: near chance or no better than noise) are left out
    of the fronts and the reference point, and named. Spread of HV(p) - HV(0.5): paired over ranges (each
    range's own three curves and reference point) when every cell has R >= 3 known ranges, otherwise a
    parametric bootstrap (every cell's FID and IS drawn independently from normals of sd s / sqrt(R), reference
    point and box fixed; again conservative). "reproduced" when HV(0.1) - HV(0.5) and HV(0.2) - HV(0.5) both exceed
    k * se; "not reproduced" when either is below -k * se (0.5 ahead beyond the spread); inconclusive
    otherwise; "not testable" when a p_uncond of {0.1, 0.2, 0.5} is missing.
Without any spread (no seed ranges) nothing is beyond it: the verdict is "inconclusive (no seed spread)".

Several trainings (`over_trainings`). The spread above is that of sampling seeds for fixed models; it leaves out
how the models differ from one training to the next, which on the Fashion-MNIST preset was enough to flip
finding (3) between trainings. Given m >= 2 studies that differ only in their training and sampling seeds
(`dvc exp run -S train.seed=N -S sample.seed=M` for each: the classifier and reference, hence the metric
fingerprint, stay), their cfg cells are combined into one table whose FID and IS are the means over the
trainings and whose "ranges" are the trainings: each training's full-sample value in place of a seed range's.
The rules above then apply unchanged, the paired spread being over trainings: for finding (3) each training's
own three curves and reference point give its HV differences. Each training's sampling noise is inside that
spread only if it is independent between trainings; trainings sampled with the same seed share it (the same
noise through similar models errs alike), so the spread between them would leave it out, and such studies
are refused. With m trainings a standard error rests on m - 1 degrees of freedom, so k defaults to Student t's
two-sided 95% point for them (3.18 for 4 trainings, 2.78 for 5) rather than 2; with m = 2 the unpaired rule
applies, as for 2 seed ranges. The studies must also share the (p_uncond, w) grid of cfg cells and the metric
fingerprint; each mismatch is an error naming the studies and what differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.columns import type_cells
from analysis.frontiers import measured
from analysis.selection import PAPER_METHOD, guidance_methods, require_comparable
from cfg.eval.fingerprint import FingerprintMismatch
from cfg.study.frontier import degenerate_rows, hypervolume_shares
from cfg.study.records import ID_DTYPES, guidance_name

__all__ = ["check_findings", "load_tradeoff", "markdown", "main", "over_trainings", "t_k"]

K = 2.0
MIN_PAIRED = 3  # ranges needed before a paired sd is trusted
PAPER_P = (0.1, 0.2, 0.5)
FINDINGS = {
    1: "1 FID U-shaped, min at 0<w<=1",
    2: "2 IS rises with w",
    3: "3 frontier: 0.1, 0.2 ahead of 0.5",
}
REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"
INCONCLUSIVE, NO_SPREAD = "inconclusive (within seed spread)", "inconclusive (no seed spread)"


# ---------------------------------------------------------------- loading


def _records(folder: Path) -> list[dict]:
    # the evaluate stage's cell records: <folder>/cells/*.json (a project's results/) or <folder>/cells_*.json
    out = []
    for path in sorted([*folder.glob("cells/*.json"), *folder.glob("cells_*.json")]):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out += [r for r in raw if isinstance(r, dict)] if isinstance(raw, list) else []
    return out


def _key(p_uncond, w, guidance, options, fingerprint) -> tuple:
    options = json.loads(options) if isinstance(options, str) else dict(options or {})
    return (round(float(p_uncond), 9), round(float(w), 9), guidance_name(guidance, options), str(fingerprint))


def load_tradeoff(path: str | Path) -> pd.DataFrame:
    """A study's trade-off table (`results/tradeoff.csv`, or the folder holding it), typed as the analysis
    types it (`type_cells`), with `fid_ranges` / `is_ranges` (each cell's per-range values) from the cell
    records beside it (`cells/*.json` or `cells_*.json`) where they are found."""
    path = Path(path)
    table = path / "tradeoff.csv" if path.is_dir() else path
    df = type_cells(pd.read_csv(table, dtype=ID_DTYPES))
    ranges = {}
    for r in _records(table.parent):
        try:
            key = _key(r["p_uncond"], r["w"], r["guidance"], r.get("guidance_options"), r.get("fingerprint"))
        except (KeyError, TypeError, ValueError):
            continue
        ranges[key] = r.get("ranges") or {}
    for metric in ("fid", "is"):
        df[f"{metric}_ranges"] = [
            ranges.get(
                _key(row.p_uncond, row.w, row.guidance, row.guidance_options, row.fingerprint), {}
            ).get(metric)
            for row in df.itertuples()
        ]
    df.attrs["source"] = str(table)
    return df


# ---------------------------------------------------------------- the spread


def _n_ranges(row: pd.Series) -> float:
    known = [len(v) for v in (row.get("fid_ranges"), row.get("is_ranges")) if isinstance(v, list | tuple)]
    if known:
        return float(max(known))
    n, per = row.get("n_samples"), row.get("n_per_range")
    if n is None or per is None or pd.isna(n) or pd.isna(per) or per <= 0:
        return np.nan
    return float(round(n / per))


def _ranges(row: pd.Series, metric: str) -> list | None:
    v = row.get(f"{metric}_ranges")
    return list(v) if isinstance(v, list | tuple) else None


def _diff(a: pd.Series, b: pd.Series, metric: str) -> tuple[float, float, str]:
    """metric(a) - metric(b) on all samples, its standard error and how that was estimated."""
    d = float(a[metric] - b[metric])
    ra, rb = _ranges(a, metric), _ranges(b, metric)
    if ra is not None and rb is not None and len(ra) == len(rb) >= MIN_PAIRED:
        return d, float(np.std(np.subtract(ra, rb), ddof=1) / math.sqrt(len(ra))), "paired"
    n = min(_n_ranges(a), _n_ranges(b))
    sd = f"{metric}_range_std"
    if not (n >= 2) or sd not in a or pd.isna(a[sd]) or pd.isna(b[sd]):
        return d, np.nan, "none"
    return d, float(math.hypot(a[sd], b[sd]) / math.sqrt(n)), "unpaired"


def _paired_note(a: pd.Series, b: pd.Series, metric: str) -> str:
    """With exactly 2 known ranges the paired sd (1 degree of freedom) is shown beside the verdict's, not used."""
    ra, rb = _ranges(a, metric), _ranges(b, metric)
    if ra is None or rb is None or len(ra) != len(rb) or len(ra) >= MIN_PAIRED or len(ra) < 2:
        return ""
    se = float(np.std(np.subtract(ra, rb), ddof=1) / math.sqrt(len(ra)))
    d = float(a[metric] - b[metric])
    return f" [paired, 1 df: ± {se:.2g}, {d / se:+.1f} se]" if se > 0 else ""


def _beyond(d: float, se: float, k: float) -> int:
    """+1 / -1 when d is above / below 0 by more than k se, 0 within the spread (or no spread)."""
    if not np.isfinite(se):
        return 0
    return 1 if d > k * se else -1 if d < -k * se else 0


def _pm(d: float, se: float) -> str:
    if not np.isfinite(se):
        return f"{d:+.3g} (no spread)"
    z = f"{d / se:+.1f}" if se > 0 else ("+inf" if d > 0 else "-inf" if d < 0 else "0")
    return f"{d:+.3g} ± {se:.2g} ({z} se)"


# ---------------------------------------------------------------- the findings


def _fid_u(g: pd.DataFrame, k: float) -> tuple[str, str, dict]:
    w = g["w"].to_numpy()
    if not np.isclose(w, 0).any():
        return "not testable", "no w = 0 cell with an FID in the grid", {}
    i = int(np.argmin(g["fid"].to_numpy()))
    best, ws = g.iloc[i], float(w[i])
    zero, last = g.iloc[int(np.argmin(np.abs(w)))], g.iloc[-1]
    detail = {"w_star": ws, "fid_star": float(best["fid"])}
    head = f"w*={ws:g}, FID {best['fid']:.3g}"
    if 0 < ws <= 1:
        arms = [_diff(zero, best, "fid"), _diff(last, best, "fid")]
        detail |= {
            "fid0_minus_star": arms[0][0],
            "se0": arms[0][1],
            "fidmax_minus_star": arms[1][0],
            "semax": arms[1][1],
            "w_max": float(last["w"]),
            "se_kind": arms[0][2],
        }
        text = (
            f"{head}; FID(0)−FID(w*) {_pm(*arms[0][:2])}{_paired_note(zero, best, 'fid')}; "
            f"FID({last['w']:g})−FID(w*) {_pm(*arms[1][:2])}{_paired_note(last, best, 'fid')}"
        )
        if any(not np.isfinite(se) for _, se, _ in arms):
            return NO_SPREAD, text, detail
        ok = all(_beyond(d, se, k) > 0 for d, se, _ in arms)
        return (REPRODUCED if ok else INCONCLUSIVE), text, detail
    inside = g[(g["w"] > 0) & (g["w"] <= 1)]
    if inside.empty:
        return "not testable", f"{head}; no w in (0, 1] in the grid", detail
    gaps = [(float(r["w"]), *_diff(r, best, "fid")) for _, r in inside.iterrows()]
    z = [
        d / se if np.isfinite(se) and se > 0 else (np.inf if np.isfinite(se) else np.nan)
        for _, d, se, _ in gaps
    ]
    j = int(np.nanargmin(z)) if not np.isnan(z).all() else int(np.argmin([d for _, d, _, _ in gaps]))
    wj, d, se, kind = gaps[j]
    detail |= {"closest_w": wj, "fid_closest_minus_star": d, "se": se, "se_kind": kind}
    row_j = inside[np.isclose(inside["w"], wj)].iloc[0]
    text = (
        f"{head} (outside (0, 1]); closest w in (0, 1]: w={wj:g}, FID(w)−FID(w*) {_pm(d, se)}"
        f"{_paired_note(row_j, best, 'fid')}"
    )
    if not np.isfinite(se):
        return NO_SPREAD, text, detail
    ok = all(_beyond(d_, se_, k) > 0 for _, d_, se_, _ in gaps)
    return (NOT_REPRODUCED if ok else INCONCLUSIVE), text, detail


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 1 and rx.std() > 0 and ry.std() > 0 else np.nan


def _is_rises(g: pd.DataFrame, k: float) -> tuple[str, str, dict]:
    if len(g) < 2:
        return "not testable", "fewer than two w", {}
    rows = [r for _, r in g.iterrows()]
    steps = []
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        d, se, kind = _diff(b, a, "is")
        steps.append(
            {"step": f"{a['w']:g}->{b['w']:g}", "d": d, "se": se, "kind": kind, "sign": _beyond(d, se, k)}
        )
    end_d, end_se, _ = _diff(rows[-1], rows[0], "is")
    rho = _spearman(g["w"].to_numpy(), g["is"].to_numpy())
    falls = [s for s in steps if s["sign"] < 0]
    dips = [s for s in steps if s["sign"] == 0 and s["d"] < 0]
    rising = sum(s["sign"] > 0 for s in steps)
    text = (
        f"IS {rows[0]['is']:.3g}→{rows[-1]['is']:.3g} (w {rows[0]['w']:g}→{rows[-1]['w']:g}), "
        f"rise {_pm(end_d, end_se)}; Spearman {rho:.2f}; {rising}/{len(steps)} steps rise beyond spread"
    )
    if falls:
        text += "; falls beyond spread: " + ", ".join(f"{s['step']} {_pm(s['d'], s['se'])}" for s in falls)
    if dips:
        text += "; dips within spread: " + ", ".join(f"{s['step']} ({s['d']:+.3g})" for s in dips)
    detail = {
        "end_rise": end_d,
        "end_se": end_se,
        "spearman": rho,
        "steps": steps,
        "falls_beyond_spread": [s["step"] for s in falls],
        "se_kind": steps[0]["kind"],
    }
    if falls:
        return NOT_REPRODUCED, text, detail
    # IS higher at every larger w in the point estimates (Spearman's ρ = 1 in exact arithmetic; its float can
    # come out 1 − 2⁻⁵³, so the rise is checked directly), and the end-to-end rise beyond the spread
    rises_everywhere = bool(np.all(np.diff(g.sort_values("w")["is"].to_numpy(float)) > 0))
    if all(s["sign"] > 0 for s in steps) or (rises_everywhere and _beyond(end_d, end_se, k) > 0):
        return REPRODUCED, text, detail
    return (NO_SPREAD if not np.isfinite(end_se) else INCONCLUSIVE), text, detail


def _frontier(
    cells: pd.DataFrame, k: float, n_boot: int, seed: int, unit: str = "ranges"
) -> tuple[str, str, dict]:
    have = sorted(cells["p_uncond"].unique().tolist())
    paper = {q: next((p for p in have if np.isclose(p, q)), None) for q in PAPER_P}
    if any(v is None for v in paper.values()):
        return "not testable", f"p_uncond present: {', '.join(f'{p:g}' for p in have)}", {"p_uncond": have}
    sub = cells[cells["p_uncond"].isin(list(paper.values()))].reset_index(drop=True)
    n_w = int(sub.groupby("p_uncond").size().max())
    # cells without FID or IS (a failed metric) are no point of a front: out, named
    gap = (~measured(sub)).to_numpy()
    missing = [f"p_uncond={r.p_uncond:g} w={r.w:g}" for r in sub[gap].itertuples()]
    sub = sub[~gap].reset_index(drop=True)
    # degenerate cells say nothing about guidance: out of the fronts and the reference point, named
    bad = degenerate_rows(sub).to_numpy()
    left_out = [f"p_uncond={r.p_uncond:g} w={r.w:g}" for r in sub[bad].itertuples()]
    sub = sub[~bad].reset_index(drop=True)
    gone = [q for q, v in paper.items() if not np.isclose(sub["p_uncond"], v).any()]
    if gone:
        why = [f"degenerate ({', '.join(left_out)})"] if left_out else []
        why += [f"missing FID or IS ({', '.join(missing)})"] if missing else []
        text = f"every cell of p_uncond {', '.join(f'{q:g}' for q in gone)} {' or '.join(why)}"
        return "not testable", text, {"degenerate": left_out, "missing": missing}
    p = sub["p_uncond"].map({v: q for q, v in paper.items()}).to_numpy(float)
    fid, is_ = sub["fid"].to_numpy(float), sub["is"].to_numpy(float)
    hv, ref = hypervolume_shares(fid, is_, p, n_w)
    fr, ir = [_ranges(r, "fid") for _, r in sub.iterrows()], [_ranges(r, "is") for _, r in sub.iterrows()]
    lens = {len(v) if v is not None else 0 for v in fr + ir}
    diffs = {q: [] for q in (0.1, 0.2)}
    if len(lens) == 1 and (n := lens.pop()) >= MIN_PAIRED:
        how = f"paired over {n} {unit}"
        for r in range(n):
            s, _ = hypervolume_shares(np.array([v[r] for v in fr]), np.array([v[r] for v in ir]), p, n_w)
            for q in diffs:
                diffs[q].append(s[q] - s[0.5])
        se = {q: float(np.std(v, ddof=1) / math.sqrt(n)) for q, v in diffs.items()}
    else:
        n = np.array([_n_ranges(r) for _, r in sub.iterrows()])
        sd_f = (
            sub["fid_range_std"].to_numpy(float) / np.sqrt(n)
            if "fid_range_std" in sub
            else np.full(len(sub), np.nan)
        )
        sd_i = (
            sub["is_range_std"].to_numpy(float) / np.sqrt(n)
            if "is_range_std" in sub
            else np.full(len(sub), np.nan)
        )
        if np.isfinite(sd_f).all() and np.isfinite(sd_i).all() and n_boot > 1:
            how = f"bootstrap of cell noise, {n_boot} draws"
            rng = np.random.default_rng(seed)
            for _ in range(n_boot):
                s, _ = hypervolume_shares(fid + rng.normal(0, sd_f), is_ + rng.normal(0, sd_i), p, n_w, ref)
                for q in diffs:
                    diffs[q].append(s[q] - s[0.5])
            se = {q: float(np.std(v, ddof=1)) for q, v in diffs.items()}
        else:
            how, se = "no seed spread", {0.1: np.nan, 0.2: np.nan}
    d = {q: hv[q] - hv[0.5] for q in (0.1, 0.2)}
    text = (
        f"HV share 0.1: {hv[0.1]:.3f}, 0.2: {hv[0.2]:.3f}, 0.5: {hv[0.5]:.3f}; "
        f"0.1−0.5 {_pm(d[0.1], se[0.1])}; 0.2−0.5 {_pm(d[0.2], se[0.2])} ({how}); "
        f"reference point FID {ref[0]:.4g}, IS {ref[1]:.4g}"
        + (f"; degenerate, left out: {', '.join(left_out)}" if left_out else "")
        + (f"; missing FID or IS, left out: {', '.join(missing)}" if missing else "")
    )
    detail = {
        "hypervolume": {f"{q:g}": hv[q] for q in PAPER_P},
        "diff_vs_0.5": {f"{q:g}": d[q] for q in d},
        "se": {f"{q:g}": se[q] for q in se},
        "spread": how,
        "ref_fid": ref[0],
        "ref_is": ref[1],
        "degenerate": left_out,
        "missing": missing,
    }
    signs = [_beyond(d[q], se[q], k) for q in d]
    if any(s < 0 for s in signs):
        return NOT_REPRODUCED, text, detail
    if all(s > 0 for s in signs):
        return REPRODUCED, text, detail
    return (NO_SPREAD if not all(np.isfinite(list(se.values()))) else INCONCLUSIVE), text, detail


def _cfg_cells(df: pd.DataFrame) -> pd.DataFrame:
    out = df[guidance_methods(df) == PAPER_METHOD]
    out = out[out["w"] >= 0]
    dup = out.duplicated(["p_uncond", "w"])
    if dup.any():
        raise ValueError(
            f"several rows for the same (p_uncond, w), e.g. {out.loc[dup, ['p_uncond', 'w']].iloc[0].tolist()}: "
            "pick one study first (analysis.selection.select)"
        )
    return out.sort_values(["p_uncond", "w"]).reset_index(drop=True)


# over trainings: a training's own identifiers (left out of the combined table), and the metrics averaged beside
# FID and IS
PER_TRAINING = ("seed", "mlflow_run_id", "checkpoint", "weights")
AVERAGED = ("class_acc", "kid_x1e3", "precision", "recall")


def over_trainings(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Several trainings of one study (each a trade-off table, `load_tradeoff`) as one table for
    `check_findings`: per cfg cell (w >= 0) `fid` and `is` are the means over the trainings, `fid_ranges` /
    `is_ranges` each training's value, `fid_range_std` / `is_range_std` their sd, so that the spread is the one
    between trainings (module docstring); AVERAGED metrics are means too, PER_TRAINING columns and each
    training's seed-range statistics are left out. attrs: `trainings` (m), `source` (the studies)."""
    if len(tables) < 2:
        raise ValueError(f"a spread over trainings needs at least 2 studies, got {len(tables)}")
    sources = [str(t.attrs.get("source", f"study {i + 1}")) for i, t in enumerate(tables)]
    cells = []
    for t, src in zip(tables, sources, strict=True):
        require_comparable(t)
        c = _cfg_cells(t)
        if c.empty:
            raise ValueError(f"{src}: no cfg cells with w >= 0")
        cells.append(c)
    prints = [str(c["fingerprint"].iloc[0]) for c in cells]
    if len(set(prints)) > 1:
        raise FingerprintMismatch(
            "the trainings' metrics are not comparable (another classifier or reference): "
            + ", ".join(f"{src}: {fp}" for src, fp in zip(sources, prints, strict=True))
            + "; vary only the training (dvc exp run -S train.seed=N keeps the fingerprint)",
            ["fingerprint"],
        )
    if all("seed" in c for c in cells):  # the sampling seed (a pipeline's table has it)
        seen: dict[int, str] = {}
        for src, c in zip(sources, cells, strict=True):
            for sd in sorted({int(x) for x in c["seed"].dropna()}):
                if sd in seen:
                    raise ValueError(
                        f"{seen[sd]} and {src} were sampled with the same seed ({sd}): their sampling noise is "
                        "shared, so the spread between them leaves it out; vary sample.seed with train.seed "
                        "(dvc exp run -S train.seed=N -S sample.seed=M, M different in every training)"
                    )
                seen[sd] = src
    grid = [list(zip(c["p_uncond"].round(9), c["w"].round(9), strict=True)) for c in cells]
    for src, g in zip(sources[1:], grid[1:], strict=True):
        if g != grid[0]:
            missing, extra = sorted(set(grid[0]) - set(g)), sorted(set(g) - set(grid[0]))
            raise ValueError(
                f"{src} has another (p_uncond, w) grid than {sources[0]}: "
                + "; ".join(
                    f"{what} {', '.join(f'({p:g}, {w:g})' for p, w in cells_[:5])}"
                    for what, cells_ in (("missing", missing), ("extra", extra))
                    if cells_
                )
            )
    # one training's own columns (its seed ranges' statistics, its runs, seed and checkpoint) say nothing of the
    # mean: left out; the other metrics a cell has in every training (class_acc decides degenerate cells) averaged
    own = [
        c
        for c in cells[0]
        if c.endswith(("_ranges", "_range_std", "_range_mean", "_std")) or c in PER_TRAINING
    ]
    out = cells[0].drop(columns=own).copy()
    for metric in AVERAGED:
        if all(metric in c for c in cells):
            out[metric] = np.stack([c[metric].to_numpy(float) for c in cells], axis=1).mean(axis=1)
    for metric in ("fid", "is"):
        values = np.stack([c[metric].to_numpy(float) for c in cells], axis=1)  # cells x trainings
        out[metric] = values.mean(axis=1)
        out[f"{metric}_ranges"] = [list(map(float, v)) for v in values]
        out[f"{metric}_range_std"] = values.std(axis=1, ddof=1)
    out.attrs = {"source": " + ".join(sources), "trainings": len(tables)}
    return out


def t_k(m: int, level: float = 0.95) -> float:
    """Student t's two-sided `level` point for the mean of m values (m - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, m - 1))


def check_findings(df: pd.DataFrame, k: float = K, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The paper's three findings on one study (a trade-off table: `load_tradeoff`, or `select` of the tidy
    run table), or on several trainings of one (`over_trainings`): one row per (finding, p_uncond) with
    `finding`, `p_uncond` (the frontier's row: "0.1, 0.2 vs 0.5"), `verdict`, `numbers` (text) and `detail`
    (the numbers as a dict). Rules: the module docstring. attrs: k, the trainings (None for one study), the
    p_uncond and w of the cells used, n_samples and seed ranges."""
    require_comparable(df)
    cells = _cfg_cells(df)
    if cells.empty:
        raise ValueError("no cfg cells with w >= 0 in the frame")
    rows = []
    for finding, check, metric in ((1, _fid_u, "fid"), (2, _is_rises, "is")):
        for p, g in cells.groupby("p_uncond"):
            missing = g["w"][g[metric].isna()].tolist()  # a failed metric: left out and named, never the best
            verdict, numbers, detail = check(g[g[metric].notna()].reset_index(drop=True), k)
            if missing:
                numbers += (
                    f"; {metric.upper()} missing at w = {', '.join(f'{w:g}' for w in missing)} (left out)"
                )
                detail = detail | {"missing_w": missing}
            rows.append(
                {
                    "finding": FINDINGS[finding],
                    "p_uncond": f"{p:g}",
                    "verdict": verdict,
                    "numbers": numbers,
                    "detail": detail,
                }
            )
    trainings = df.attrs.get("trainings")
    verdict, numbers, detail = _frontier(cells, k, n_boot, seed, "trainings" if trainings else "ranges")
    rows.append(
        {
            "finding": FINDINGS[3],
            "p_uncond": "0.1, 0.2 vs 0.5",
            "verdict": verdict,
            "numbers": numbers,
            "detail": detail,
        }
    )
    out = pd.DataFrame(rows)
    n = cells.apply(_n_ranges, axis=1)
    out.attrs = {
        "k": k,
        "trainings": trainings,
        "p_uncond": sorted(cells["p_uncond"].unique().tolist()),
        "w": sorted(cells["w"].unique().tolist()),
        "n_samples": sorted(cells["n_samples"].dropna().unique().tolist()) if "n_samples" in cells else [],
        "seed_ranges": sorted(n.dropna().unique().tolist()),
        "per_range_values": bool(
            cells.get("fid_ranges", pd.Series(dtype=object)).map(lambda v: isinstance(v, list)).all()
        ),
    }
    return out


def markdown(findings: pd.DataFrame) -> str:
    """The findings as a markdown table: finding, p_uncond, verdict, numbers."""
    lines = ["| finding | p_uncond | verdict | numbers |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.finding} | {r.p_uncond} | {r.verdict} | {r.numbers} |" for r in findings.itertuples()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.findings", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "path",
        nargs="+",
        help="a results folder (tradeoff.csv, cells/*.json) or a tradeoff.csv; several: trainings of one study, "
        "the spread then between them",
    )
    ap.add_argument("--json", type=Path, help="also write the findings as JSON here")
    ap.add_argument(
        "--k",
        type=float,
        help=f"a difference counts beyond k standard errors ({K:g}; over m trainings Student t's 95%% point)",
    )
    args = ap.parse_args(argv)
    tables = [load_tradeoff(path) for path in args.path]
    try:
        df = over_trainings(tables) if len(tables) > 1 else tables[0]
    except ValueError as e:  # FingerprintMismatch is one
        raise SystemExit(f"error: {e}") from None
    m = df.attrs.get("trainings")
    k = args.k if args.k is not None else t_k(m) if m else K
    f = check_findings(df, k=k)
    a = f.attrs
    spread = (
        f"{m} trainings (the spread between them; Student t, {m - 1} df)"
        if m
        else f"seed ranges {', '.join(f'{n:g}' for n in a['seed_ranges'])}"
        f"{' (per-range values known)' if a['per_range_values'] else ''}"
    )
    print(
        f"{df.attrs['source']}: cfg cells, w >= 0: p_uncond {', '.join(f'{p:g}' for p in a['p_uncond'])}; "
        f"{len(a['w'])} w ({', '.join(f'{w:g}' for w in a['w'])}); n_samples {', '.join(f'{n:g}' for n in a['n_samples'])}; "
        f"{spread}; beyond the spread: > {a['k']:.3g} se\n"
    )
    print(markdown(f))
    if args.json:
        payload = {"source": df.attrs["source"], **a, "findings": f.to_dict(orient="records")}
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
