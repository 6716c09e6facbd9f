"""FID-vs-IS frontiers of guidance methods on one protocol: Pareto sets, hypervolume, set dominance.

FID is lower-better, IS higher-better. Every method of a study is swept over the same w grid with the same
noise and the same model (per p_uncond), so its frontier, hypervolume and best FID compare directly with the
others'; the spread over disjoint seed ranges (`CellRecord.ranges`) says how much of a difference is noise.
Degenerate cells (`cfg.eval.sanity`: near chance or no better than noise) say nothing about guidance: they are
named per method and left out of its frontier, best FID, hypervolume and dominance, and out of the hypervolume's
reference point (`reference_point`). `analysis.frontiers` re-exports `pareto_mask` and `hypervolume`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pandas as pd

from cfg.eval.sanity import degenerate_cells
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


def reference_point(fid: np.ndarray, is_: np.ndarray, n_w: int) -> tuple[float, float, float, float]:
    """(ref_fid, ref_is, ideal_fid, ideal_is): where the hypervolumes of methods compared on one model are
    measured from, given every method's non-degenerate cells (fid, is) and the number of w per method.

    The ideal point is the lowest FID and the highest IS of the cells; the nadir point the highest FID and the
    lowest IS *on their joint Pareto front* (`pareto_mask` of all methods' cells together). In units of
    nadir - ideal per objective, the reference lies 1 / (n_w - 1) beyond the nadir: for n_w points spread over
    a linear front this is the closest reference at which the front's two end points still add area
    (Ishibuchi et al. 2018, "How to specify a reference point in hypervolume calculation for fair performance
    comparison", Evol. Comput. 26(3)), so each front's extreme cells count.

    Why not the worst cells, with a margin (what this did before): one far-off cell then sets the box. In the
    guidance-methods preset on the digits, APG's FID 424 at w = 4 made the box ~50x taller than the region
    where the methods differ, and every method scored 0.95-1.00; leaving degenerate cells out is not enough,
    as the next-worst cells (CFG++ at w = 4, FID 185; IS 7.4 at w = -1) lie far behind the joint front too and
    stretch the box over a region that no method's trade-off is decided in. Cells behind the joint front's
    nadir add nothing: a method has hypervolume 0 when none of its cells comes near the best of the others'
    (its `dominated_by` then says whose cells beat it). Where the joint front is one point (no span in an
    objective), that objective's span over all cells stands in for nadir - ideal.
    """
    fid, is_ = np.asarray(fid, float), np.asarray(is_, float)
    front = pareto_mask(fid, is_)
    ideal_fid, ideal_is = float(fid.min()), float(is_.max())
    span_fid = float(fid[front].max()) - ideal_fid or float(np.ptp(fid))
    span_is = ideal_is - float(is_[front].min()) or float(np.ptp(is_))
    margin = 1 / max(n_w - 1, 1)
    return ideal_fid + (1 + margin) * span_fid, ideal_is - (1 + margin) * span_is, ideal_fid, ideal_is


def front_dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether point set `a` (rows (fid, is)) dominates set `b`: every point of b is weakly dominated by a point
    of a, and some point of b strictly."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    weak = (a[None, :, 0] <= b[:, None, 0]) & (
        a[None, :, 1] >= b[:, None, 1]
    )  # [j, i]: a_i no worse than b_j
    strict = weak & ((a[None, :, 0] < b[:, None, 0]) | (a[None, :, 1] > b[:, None, 1]))
    return bool(weak.any(axis=1).all() and strict.any())


def degenerate_rows(df: pd.DataFrame) -> pd.Series:
    """Per row of a trade-off table or tidy frame, whether its cell is degenerate (`cfg.eval.sanity`), as far
    as its columns tell (class_acc, chance_acc, n_samples, noise_fid, fid; a check whose column is missing or
    empty is skipped)."""
    flags = []
    for _, r in df.iterrows():
        options = r.get("guidance_options")
        row = SimpleNamespace(
            p_uncond=r["p_uncond"],
            w=r["w"],
            guidance=r.get("guidance", "cfg"),
            guidance_options=json.loads(options) if isinstance(options, str) else dict(options or {}),
            metrics={k: _value(r, k) for k in ("fid", "class_acc")},
            n_samples=_value(r, "n_samples"),
            chance_acc=_value(r, "chance_acc"),
            noise_fid=_value(r, "noise_fid"),
        )
        flags.append(bool(degenerate_cells([row])))
    return pd.Series(flags, index=df.index, dtype=bool)


def _cells(data: list[CellRecord] | pd.DataFrame) -> list[dict]:
    # (p_uncond, method, w, fid, is, fid sd, per-range fid and is, degenerate) of records, or of a trade-off
    # table / tidy frame (degenerate as far as its columns tell: `degenerate_rows`)
    if isinstance(data, pd.DataFrame):
        out = []
        for (_, r), bad in zip(data.iterrows(), degenerate_rows(data), strict=True):
            options = r["guidance_options"]
            options = json.loads(options) if isinstance(options, str) else dict(options or {})
            out.append(
                {
                    "p_uncond": r["p_uncond"],
                    "method": guidance_name(r["guidance"], options),
                    "w": r["w"],
                    "fid": r["fid"],
                    "is": r["is"],
                    "sd": _value(r, "fid_range_std"),
                    "ranges": {},
                    "degenerate": bad,
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
            "degenerate": bool(degenerate_cells([r])),
        }
        for r in data
    ]


def _value(row: pd.Series, column: str):
    # a table cell, None where the column is missing or empty
    v = row.get(column)
    return None if v is None or pd.isna(v) else v


def compare_methods(data: list[CellRecord] | pd.DataFrame) -> pd.DataFrame:
    """Per (p_uncond, guidance method with options): its FID-vs-IS frontier against the others' on the same model.

    Columns: `method` (`guidance_name`), n_w (its cells), `degenerate_w` (the w of its degenerate cells, which
    every other column leaves out), n_pareto, pareto_w; best_fid, best_fid_w and best_fid_sd (the sd of FID over
    seed ranges at that cell); `hypervolume`: the area its cells dominate up to the reference point
    (`reference_point` of all methods' non-degenerate cells of that p_uncond: `ref_fid`, `ref_is`) as a share of
    the box from there to the ideal point (lowest FID, highest IS); `hypervolume_sd`: its sd over the seed ranges,
    each range compared on its own (its cells' FID and IS, its own reference point: the methods share each
    range's examples and noise, and a range's smaller sample count biases every FID upwards; records only: a
    table has no per-range values); `dominates` / `dominated_by`: the methods whose cells its cells dominate as
    a set (`front_dominates`), `;`-joined. A method whose every cell is degenerate keeps its row, with NaN
    numbers and empty fronts. Rows in the order of methods in `data` (cell records, or the trade-off table /
    a tidy frame of one study).
    """
    rows = []
    by_p: dict[float, dict[str, list[dict]]] = {}
    for c in _cells(data):
        by_p.setdefault(c["p_uncond"], {}).setdefault(c["method"], []).append(c)
    for p, methods in by_p.items():
        valid = {m: [c for c in cells if not c["degenerate"]] for m, cells in methods.items()}
        every = [c for cells in valid.values() for c in cells]
        n_w = max(len(cells) for cells in methods.values())
        hv, ref_fid, ref_is = _hypervolumes(valid, n_w, lambda c: (c["fid"], c["is"]))
        ranged = every and all("fid" in c["ranges"] and "is" in c["ranges"] for c in every)
        n_ranges = min(len(c["ranges"]["fid"]) for c in every) if ranged else 0
        hv_ranges = [
            _hypervolumes(valid, n_w, lambda c, j=j: (c["ranges"]["fid"][j], c["ranges"]["is"][j]))[0]
            for j in range(n_ranges)
        ]
        points = {
            m: np.array([[c["fid"], c["is"]] for c in cells]).reshape(-1, 2) for m, cells in valid.items()
        }
        for m, cells in valid.items():
            pts = points[m]
            row = {
                "p_uncond": p,
                "method": m,
                "n_w": len(methods[m]),
                "degenerate_w": [c["w"] for c in methods[m] if c["degenerate"]],
                "n_pareto": 0,
                "pareto_w": [],
                "best_fid": np.nan,
                "best_fid_w": np.nan,
                "best_fid_sd": None,
                "hypervolume": hv[m],
                "hypervolume_sd": None,
                "ref_fid": ref_fid,
                "ref_is": ref_is,
                "dominates": ";".join(o for o in methods if o != m and front_dominates(pts, points[o])),
                "dominated_by": ";".join(o for o in methods if o != m and front_dominates(points[o], pts)),
            }
            if cells:
                front = pareto_mask(pts[:, 0], pts[:, 1])
                k = int(np.argmin(pts[:, 0]))
                row |= {
                    "n_pareto": int(front.sum()),
                    "pareto_w": [c["w"] for c, f in zip(cells, front, strict=True) if f],
                    "best_fid": float(pts[k, 0]),
                    "best_fid_w": cells[k]["w"],
                    "best_fid_sd": cells[k]["sd"],
                    "hypervolume_sd": statistics.stdev(h[m] for h in hv_ranges) if n_ranges > 1 else None,
                }
            rows.append(row)
    return pd.DataFrame(rows)


def hypervolume_shares(
    fid: np.ndarray,
    is_: np.ndarray,
    groups: np.ndarray,
    n_w: int,
    ref: tuple[float, float, float] | None = None,
) -> tuple[dict, tuple[float, float, float]]:
    """({group: hypervolume share}, (ref_fid, ref_is, box)) of cells (fid, is_) by `groups` (a guidance method, a
    p_uncond): the area a group's cells dominate up to the reference point, as a share of the box between that
    point and the ideal point. The reference is `reference_point` of all the cells (n_w w per group) unless `ref`
    = (ref_fid, ref_is, box) is given, held fixed (a bootstrap of the cells' noise). NaN where there is no box.
    The one definition of the share: the methods report (`compare_methods`), `analysis.findings` and
    `analysis.frontiers.rank_frontiers` use it."""
    fid, is_, groups = np.asarray(fid, float), np.asarray(is_, float), np.asarray(groups)
    if ref is None:
        ref_fid, ref_is, ideal_fid, ideal_is = reference_point(fid, is_, n_w)
        ref = (ref_fid, ref_is, (ideal_is - ref_is) * (ref_fid - ideal_fid))
    ref_fid, ref_is, box = ref
    shares = {}
    for g in np.unique(groups):
        m = groups == g
        area = hypervolume(fid[m], is_[m], ref_fid, ref_is)  # dominated cells add nothing: no front needed
        shares[g.item() if hasattr(g, "item") else g] = area / box if box > 0 else np.nan
    return shares, ref


def _hypervolumes(
    valid: dict[str, list[dict]], n_w: int, point: Callable[[dict], tuple[float, float]]
) -> tuple[dict[str, float], float, float]:
    """({method: hypervolume share}, ref_fid, ref_is) of the methods' cells, (fid, is) = point(cell), with the
    reference point of all of them (`hypervolume_shares`); NaN where there is no cell or no box."""
    cells = [(point(c), m) for m, cs in valid.items() for c in cs]
    if not cells:
        return {m: np.nan for m in valid}, np.nan, np.nan
    fid, is_ = np.array([xy for xy, _ in cells], float).T
    shares, (ref_fid, ref_is, _) = hypervolume_shares(fid, is_, np.array([m for _, m in cells]), n_w)
    return {m: shares.get(m, np.nan) for m in valid}, ref_fid, ref_is


def dominance_sentences(table: pd.DataFrame, baseline: str = "cfg") -> list[str]:
    """`compare_methods`' verdicts in words, per p_uncond: which methods' cells dominate which, how each
    compares with `baseline` in hypervolume and best FID against the seed spread, which cells are degenerate."""
    lines = []
    for p, g in table.groupby("p_uncond", sort=False):
        base = g[(g["method"] == baseline) & g["best_fid"].notna()]
        for _, r in g.iterrows():
            head = f"p_uncond={p:g}, `{r['method']}`: "
            ws = ", ".join(f"{w:g}" for w in r["degenerate_w"])
            if pd.isna(r["best_fid"]):
                lines.append(head + f"every cell degenerate (w = {ws}): no frontier, compared with nothing")
                continue
            hv_sd, sd = r["hypervolume_sd"], r["best_fid_sd"]
            text = head + f"hypervolume {r['hypervolume']:.3f}"
            text += f" (± {hv_sd:.3f} over seed ranges)" if _known(hv_sd) else ""
            text += f", best FID {r['best_fid']:.3f}" + (f" ± {sd:.3f}" if _known(sd) else "")
            text += f" at w = {r['best_fid_w']:g}"
            if len(base) and r["method"] != baseline:
                b = base.iloc[0]
                for what, col in (("hypervolume", "hypervolume"), ("best FID", "best_fid")):
                    spread = max(v for v in (r[f"{col}_sd"], b[f"{col}_sd"], 0.0) if _known(v))
                    diff = r[col] - b[col]
                    verdict = "within" if spread and abs(diff) <= spread else "beyond"
                    text += (
                        f"; {what} {diff:+.3f} against {baseline} ({verdict} the larger seed sd {spread:.3f})"
                    )
            if ws:
                text += f"; degenerate at w = {ws} (left out of its frontier and the reference point)"
            if r["dominates"]:
                text += f"; dominates {', '.join(f'`{m}`' for m in r['dominates'].split(';'))}"
            if r["dominated_by"]:
                text += f"; dominated by {', '.join(f'`{m}`' for m in r['dominated_by'].split(';'))}"
            lines.append(text)
    return lines


def _known(v) -> bool:
    return v is not None and not pd.isna(v)
