"""FID-vs-IS frontiers of guidance methods on one protocol: Pareto sets, hypervolume, set dominance.

FID is lower-better, IS higher-better. Every method of a study is swept over the same w grid with the same
noise and the same model (per p_uncond), so its frontier, hypervolume and best FID compare directly with the
others'; the spread over disjoint seed ranges (`CellRecord.ranges`) says how much of a difference is noise.
Pure numpy / pandas; `analysis.frontiers` re-exports `pareto_mask` and `hypervolume`.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pandas as pd

from cfg.study.records import CellRecord, guidance_name


def pareto_mask(fid: np.ndarray, is_: np.ndarray) -> np.ndarray:
    """True where no other point has FID <= and IS >= with one of them strict (the FID-vs-IS Pareto set)."""
    fid, is_ = np.asarray(fid, float), np.asarray(is_, float)
    no_worse = (fid[None, :] <= fid[:, None]) & (is_[None, :] >= is_[:, None])  # [i, j]: j no worse than i
    better = (fid[None, :] < fid[:, None]) | (is_[None, :] > is_[:, None])
    return ~(no_worse & better).any(axis=1)


def hypervolume(fid: np.ndarray, is_: np.ndarray, ref_fid: float, ref_is: float) -> float:
    """Area of the (IS, FID) region the points dominate, bounded by the reference point (worst IS, worst FID)."""
    pts = sorted(
        ((i, f) for f, i in zip(fid, is_, strict=True) if f <= ref_fid and i >= ref_is), key=lambda p: -p[0]
    )
    area, best_fid = 0.0, ref_fid
    # sweep from the largest IS down; each strip's height is its best FID yet
    for k, (i, f) in enumerate(pts):
        best_fid = min(best_fid, f)
        next_is = pts[k + 1][0] if k + 1 < len(pts) else ref_is
        area += (i - next_is) * (ref_fid - best_fid)
    return area


def front_dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether point set `a` (rows (fid, is)) dominates set `b`: every point of b is weakly dominated by a point
    of a, and some point of b strictly."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    weak = (a[None, :, 0] <= b[:, None, 0]) & (
        a[None, :, 1] >= b[:, None, 1]
    )  # [j, i]: a_i no worse than b_j
    strict = weak & ((a[None, :, 0] < b[:, None, 0]) | (a[None, :, 1] > b[:, None, 1]))
    return bool(weak.any(axis=1).all() and strict.any())


def _cells(data: list[CellRecord] | pd.DataFrame) -> list[dict]:
    # (p_uncond, method, w, fid, is, fid sd, per-range fid and is) of records, or of a trade-off table / tidy frame
    if isinstance(data, pd.DataFrame):
        out = []
        for _, r in data.iterrows():
            options = r["guidance_options"]
            options = json.loads(options) if isinstance(options, str) else dict(options or {})
            sd = r.get("fid_range_std")
            out.append(
                {
                    "p_uncond": r["p_uncond"],
                    "method": guidance_name(r["guidance"], options),
                    "w": r["w"],
                    "fid": r["fid"],
                    "is": r["is"],
                    "sd": None if pd.isna(sd) else sd,
                    "ranges": {},
                }
            )
        return out
    return [
        {
            "p_uncond": r.p_uncond,
            "method": guidance_name(r.guidance, r.guidance_options),
            "w": r.w,
            "fid": r.metrics["fid"],
            "is": r.metrics["is"],
            "sd": r.metrics.get("fid_range_std"),
            "ranges": r.ranges,
        }
        for r in data
    ]


def compare_methods(data: list[CellRecord] | pd.DataFrame) -> pd.DataFrame:
    """Per (p_uncond, guidance method with options): its FID-vs-IS frontier against the others' on the same model.

    Columns: `method` (`guidance_name`), n_w, n_pareto, pareto_w; best_fid, best_fid_w and best_fid_sd (the sd
    of FID over seed ranges at that cell); `hypervolume`: the area its cells dominate up to the reference point
    (the worst IS and FID of all methods of that p_uncond, 10% of their span further) as a share of the box
    from there to the best values; `hypervolume_sd`: its sd over the seed ranges (each range's FID and IS, the
    same reference and box; records only: a table has no per-range values); `dominates` / `dominated_by`: the
    methods whose cells its cells dominate as a set (`front_dominates`), `;`-joined. Rows in the order of
    methods in `data` (cell records, or the trade-off table / a tidy frame of one study).
    """
    rows = []
    by_p: dict[float, dict[str, list[dict]]] = {}
    for c in _cells(data):
        by_p.setdefault(c["p_uncond"], {}).setdefault(c["method"], []).append(c)
    for p, methods in by_p.items():
        every = [c for cells in methods.values() for c in cells]
        fid_all = np.array([c["fid"] for c in every])
        is_all = np.array([c["is"] for c in every])
        ref_fid = fid_all.max() + 0.1 * np.ptp(fid_all)
        ref_is = is_all.min() - 0.1 * np.ptp(is_all)
        box = (is_all.max() - ref_is) * (ref_fid - fid_all.min())
        points = {m: np.array([[c["fid"], c["is"]] for c in cells]) for m, cells in methods.items()}
        for m, cells in methods.items():
            pts = points[m]
            front = pareto_mask(pts[:, 0], pts[:, 1])
            k = int(np.argmin(pts[:, 0]))
            ranged = all("fid" in c["ranges"] and "is" in c["ranges"] for c in cells)
            n_ranges = len(cells[0]["ranges"].get("fid", [])) if ranged else 0
            hv_ranges = [
                hypervolume(
                    np.array([c["ranges"]["fid"][j] for c in cells]),
                    np.array([c["ranges"]["is"][j] for c in cells]),
                    ref_fid,
                    ref_is,
                )
                / box
                for j in range(n_ranges)
            ]
            rows.append(
                {
                    "p_uncond": p,
                    "method": m,
                    "n_w": len(cells),
                    "n_pareto": int(front.sum()),
                    "pareto_w": [c["w"] for c, f in zip(cells, front, strict=True) if f],
                    "best_fid": float(pts[k, 0]),
                    "best_fid_w": cells[k]["w"],
                    "best_fid_sd": cells[k]["sd"],
                    "hypervolume": hypervolume(pts[:, 0], pts[:, 1], ref_fid, ref_is) / box
                    if box > 0
                    else np.nan,
                    "hypervolume_sd": statistics.stdev(hv_ranges) if len(hv_ranges) > 1 else None,
                    "dominates": ";".join(o for o in methods if o != m and front_dominates(pts, points[o])),
                    "dominated_by": ";".join(
                        o for o in methods if o != m and front_dominates(points[o], pts)
                    ),
                }
            )
    return pd.DataFrame(rows)


def dominance_sentences(table: pd.DataFrame, baseline: str = "cfg") -> list[str]:
    """`compare_methods`' verdicts in words, per p_uncond: which methods' cells dominate which, how each
    compares with `baseline` in hypervolume and best FID against the seed spread."""
    lines = []
    for p, g in table.groupby("p_uncond", sort=False):
        base = g[g["method"] == baseline]
        for _, r in g.iterrows():
            text = f"p_uncond={p:g}, `{r['method']}`: hypervolume {r['hypervolume']:.3f}"
            if r["hypervolume_sd"] is not None and not pd.isna(r["hypervolume_sd"]):
                text += f" (± {r['hypervolume_sd']:.3f} over seed ranges)"
            sd = r["best_fid_sd"]
            text += f", best FID {r['best_fid']:.3f}" + (
                f" ± {sd:.3f}" if sd is not None and not pd.isna(sd) else ""
            )
            text += f" at w = {r['best_fid_w']:g}"
            if len(base) and r["method"] != baseline:
                b = base.iloc[0]
                diff = r["best_fid"] - b["best_fid"]
                spread = max(v for v in (sd, b["best_fid_sd"], 0.0) if v is not None and not pd.isna(v))
                verdict = "within" if spread and abs(diff) <= spread else "beyond"
                text += (
                    f"; best FID {diff:+.3f} against {baseline} ({verdict} the larger seed sd {spread:.3f})"
                )
            if r["dominates"]:
                text += f"; dominates {', '.join(f'`{m}`' for m in r['dominates'].split(';'))}"
            if r["dominated_by"]:
                text += f"; dominated by {', '.join(f'`{m}`' for m in r['dominated_by'].split(';'))}"
            lines.append(text)
    return lines
