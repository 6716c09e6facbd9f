"""analysis/findings.py: the paper's three findings judged against the seed spread, on synthetic trade-off
frames whose answer is known by hand and on the committed embedded-default results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import findings as F
from cfg.study.frontier import compare_methods

ROOT = Path(__file__).resolve().parents[1]
W = [0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0]
U_FID = [10.0, 8.0, 6.0, 7.0, 9.0, 14.0, 20.0]  # minimum at w = 0.3
RISING_IS = [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0]


def frame(curves: dict, fid_sd=0.1, is_sd=0.05, ranges: int = 4, w=W) -> pd.DataFrame:
    """A trade-off table: curves = {p_uncond: (fid list, is list)}, the same range sd in every cell."""
    rows = []
    for p, (fid, is_) in curves.items():
        for wi, f, i in zip(w, fid, is_, strict=True):
            rows.append(
                dict(
                    p_uncond=p,
                    w=wi,
                    guidance="cfg",
                    guidance_options="{}",
                    fid=f,
                    is_=i,
                    fid_range_std=fid_sd,
                    is_range_std=is_sd,
                    n_samples=1000 * ranges,
                    n_per_range=1000,
                    fingerprint="fp",
                )
            )
    return pd.DataFrame(rows).rename(columns={"is_": "is"})


def verdict(out: pd.DataFrame, finding: int, p: str) -> str:
    row = out[(out["finding"] == F.FINDINGS[finding]) & (out["p_uncond"] == p)]
    assert len(row) == 1, out
    return row["verdict"].iloc[0]


def test_clear_u_with_minimum_at_0_3_is_reproduced():
    out = F.check_findings(frame({0.1: (U_FID, RISING_IS)}))
    assert verdict(out, 1, "0.1") == F.REPRODUCED
    d = out.iloc[0]["detail"]
    assert d["w_star"] == 0.3 and d["fid0_minus_star"] == pytest.approx(4.0)
    # unpaired se of a difference: sqrt(0.1^2 + 0.1^2) / sqrt(4)
    assert d["se0"] == pytest.approx(np.hypot(0.1, 0.1) / 2)


def test_fid_rising_from_w0_is_not_reproduced():
    fid = [5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0]
    out = F.check_findings(frame({0.1: (fid, RISING_IS)}))
    assert verdict(out, 1, "0.1") == F.NOT_REPRODUCED
    assert out.iloc[0]["detail"]["closest_w"] == 0.1
    # the same curve, but w = 0.1 only 0.1 above w = 0 with a range sd of 0.5: within the spread
    fid[1] = 5.1
    out = F.check_findings(frame({0.1: (fid, RISING_IS)}, fid_sd=0.5))
    assert verdict(out, 1, "0.1") == F.INCONCLUSIVE


def test_u_whose_dip_is_smaller_than_the_spread_is_inconclusive():
    fid = [6.3, 6.1, 6.0, 6.2, 9.0, 14.0, 20.0]  # dip of 0.3 below w = 0; se = hypot(0.5, 0.5) / 2 = 0.35
    out = F.check_findings(frame({0.1: (fid, RISING_IS)}, fid_sd=0.5))
    assert verdict(out, 1, "0.1") == F.INCONCLUSIVE
    assert "+0.3 ± 0.35" in out.iloc[0]["numbers"]
    # no seed spread at all: nothing can be beyond it
    bare = frame({0.1: (fid, RISING_IS)}).drop(columns=["fid_range_std", "is_range_std", "n_per_range"])
    assert verdict(F.check_findings(bare), 1, "0.1") == F.NO_SPREAD


def test_paired_ranges_decide_when_three_or_more_are_known():
    # the dip (0.3) is within the unpaired spread, but every range shows it: shared noise cancels in the pair
    fid = [6.3, 6.1, 6.0, 6.2, 9.0, 14.0, 20.0]
    df = frame({0.1: (fid, RISING_IS)}, fid_sd=0.5)
    offsets = np.array([-0.6, -0.2, 0.2, 0.6])  # common to every w of a range
    df["fid_ranges"] = [list(f + offsets + 0.01 * np.arange(4) * i) for i, f in enumerate(df["fid"])]
    out = F.check_findings(df)
    assert verdict(out, 1, "0.1") == F.REPRODUCED
    assert out.iloc[0]["detail"]["se_kind"] == "paired"
    # with two ranges the paired sd (1 df) is only shown, the unpaired bound decides
    two = frame({0.1: (fid, RISING_IS)}, fid_sd=0.5, ranges=2)
    two["fid_ranges"] = [[f - 0.5, f + 0.5 + 0.01 * i] for i, f in enumerate(two["fid"])]
    out = F.check_findings(two)
    assert verdict(out, 1, "0.1") == F.INCONCLUSIVE and "[paired, 1 df" in out.iloc[0]["numbers"]


def test_is_dip_beyond_spread_is_named():
    is_ = [5.0, 5.5, 6.0, 5.5, 7.0, 7.5, 8.0]  # falls 0.5 from w = 0.3 to 0.5; se = hypot(.05, .05) / 2
    out = F.check_findings(frame({0.1: (U_FID, is_)}))
    assert verdict(out, 2, "0.1") == F.NOT_REPRODUCED
    row = out[out["finding"] == F.FINDINGS[2]].iloc[0]
    assert row["detail"]["falls_beyond_spread"] == ["0.3->0.5"]
    assert "falls beyond spread: 0.3->0.5" in row["numbers"]
    # a small dip within the spread, rising end to end beyond it: Spearman < 1 and not every step rises
    # beyond the spread, so inconclusive, the dip listed
    is_[3] = 5.98
    out = F.check_findings(frame({0.1: (U_FID, is_)}, is_sd=0.2))
    assert verdict(out, 2, "0.1") == F.INCONCLUSIVE
    assert "dips within spread: 0.3->0.5" in out[out["finding"] == F.FINDINGS[2]].iloc[0]["numbers"]
    assert verdict(F.check_findings(frame({0.1: (U_FID, RISING_IS)})), 2, "0.1") == F.REPRODUCED


def test_is_rising_at_every_w_on_any_grid_size_is_reproduced():
    """A strictly rising IS with the end-to-end rise beyond the spread, but its single steps within it: reproduced
    on every grid size (a Spearman ρ compared with 1.0 exactly missed grids where its float is 1 − 2⁻⁵³, 5 w here)."""
    for n in (2, 3, 5, 7, 10):
        w = [0.0, 0.1, 0.3, 1.0, 4.0] if n == 5 else list(np.linspace(0.0, 4.0, n))
        is_ = [5.0 + 0.4 * i / (n - 1) for i in range(n)]  # +0.4 end to end; se of a step hypot(.1, .1) / 2
        out = F.check_findings(frame({0.1: ([10.0] * n, is_)}, is_sd=0.1, w=w))
        row = out[out["finding"] == F.FINDINGS[2]].iloc[0]
        assert row["verdict"] == F.REPRODUCED, (n, row["numbers"])


def frontier_curves(fid_shift_05: float) -> dict:
    # 0.1 and 0.2 share one curve; 0.5's is that curve with FID worse by fid_shift_05 at every w
    return {
        0.1: (U_FID, RISING_IS),
        0.2: (U_FID, RISING_IS),
        0.5: ([f + fid_shift_05 for f in U_FID], RISING_IS),
    }


def as_methods(df: pd.DataFrame) -> pd.DataFrame:
    """The p_uncond curves of a frame as guidance methods of one model: what the methods report compares."""
    return df.assign(guidance=[f"p{p:g}" for p in df["p_uncond"]], p_uncond=0.2)


def test_frontier_where_05_is_dominated_is_reproduced():
    df = frame(frontier_curves(3.0))
    out = F.check_findings(df)
    assert verdict(out, 3, "0.1, 0.2 vs 0.5") == F.REPRODUCED
    # the same hypervolume shares and reference point as the methods report's (cfg.study.frontier) on those
    # cells, each p_uncond's curve as a method
    report = compare_methods(as_methods(df)).set_index("method")
    detail = out.iloc[-1]["detail"]
    for p in (0.1, 0.2, 0.5):
        assert detail["hypervolume"][f"{p:g}"] == pytest.approx(report.loc[f"p{p:g}", "hypervolume"])
    assert (detail["ref_fid"], detail["ref_is"]) == pytest.approx(
        (report["ref_fid"].iloc[0], report["ref_is"].iloc[0])
    )
    assert detail["degenerate"] == [] and "reference point FID" in out.iloc[-1]["numbers"]
    # 0.5 ahead beyond the spread: not reproduced; a hair behind with a wide spread: inconclusive
    assert verdict(F.check_findings(frame(frontier_curves(-3.0))), 3, "0.1, 0.2 vs 0.5") == F.NOT_REPRODUCED
    wide = F.check_findings(frame(frontier_curves(0.05), fid_sd=2.0, is_sd=0.5))
    assert verdict(wide, 3, "0.1, 0.2 vs 0.5") == F.INCONCLUSIVE


def test_frontier_reference_point_ignores_cells_behind_the_fronts_and_degenerate_ones():
    df = frame(frontier_curves(3.0))
    base = F.check_findings(df).iloc[-1]["detail"]
    zero_05 = (df["p_uncond"] == 0.5) & (df["w"] == 0.0)  # FID 13, IS 5: behind 0.5's own w = 0.1 cell
    # that cell far off (FID 400), still behind the joint front: the reference point, and so every share, stay
    # as they were (the worst-cell reference would have stretched the box ~20x in FID)
    far = df.copy()
    far.loc[zero_05, "fid"] = 400.0
    out = F.check_findings(far).iloc[-1]
    assert out["detail"]["hypervolume"] == pytest.approx(base["hypervolume"])
    assert (out["detail"]["ref_fid"], out["detail"]["ref_is"]) == pytest.approx(
        (base["ref_fid"], base["ref_is"])
    )
    assert out["verdict"] == F.REPRODUCED
    # that cell degenerate (near chance) with the best FID and IS of all: left out of the front and the
    # reference point, and named
    cls = df.assign(class_acc=0.9, chance_acc=0.1)
    bad = cls.copy()
    bad.loc[zero_05, ["fid", "is", "class_acc"]] = [1.0, 9.0, 0.1]
    out = F.check_findings(bad).iloc[-1]
    assert out["detail"]["hypervolume"] == pytest.approx(base["hypervolume"])
    assert out["detail"]["degenerate"] == ["p_uncond=0.5 w=0"]
    assert "degenerate, left out: p_uncond=0.5 w=0" in out["numbers"]
    # counted, it would have dominated every curve and made 0.5 the best frontier
    counted = compare_methods(as_methods(bad.assign(class_acc=0.9))).set_index("method")
    assert counted["hypervolume"].idxmax() == "p0.5"
    # every cell of 0.5 degenerate: nothing to compare with
    gone = cls.assign(class_acc=np.where(cls["p_uncond"] == 0.5, 0.1, 0.9))
    out = F.check_findings(gone).iloc[-1]
    assert out["verdict"] == "not testable" and "every cell of p_uncond 0.5 degenerate" in out["numbers"]


def test_frontier_without_05_is_not_testable():
    curves = frontier_curves(3.0)
    del curves[0.5]
    out = F.check_findings(frame(curves))
    assert verdict(out, 3, "0.1, 0.2 vs 0.5") == "not testable"
    assert "0.1, 0.2" in out.iloc[-1]["numbers"]


def test_other_methods_and_negative_w_are_left_out():
    df = frame({0.1: (U_FID, RISING_IS)})
    extra = df.iloc[[0]].assign(w=-1.0, fid=1.0)  # an unconditional cell far better than any: not counted
    other = df.assign(guidance="interval", guidance_options='{"lambda_lo": -3.0}', fid=0.5)
    out = F.check_findings(pd.concat([df, extra, other], ignore_index=True))
    assert verdict(out, 1, "0.1") == F.REPRODUCED
    assert out.attrs["w"] == W


def test_a_missing_metric_is_left_out_named_and_never_the_best():
    # FID failed at the curve's minimum (w = 0.3): w* is the measured minimum, w = 0.5 (7.0), not the NaN
    fid = [np.nan if w == 0.3 else f for w, f in zip(W, U_FID, strict=True)]
    is_ = [np.nan if w == 1.0 else i for w, i in zip(W, RISING_IS, strict=True)]
    out = F.check_findings(frame({0.1: (fid, is_)}))
    row = out[out["finding"] == F.FINDINGS[1]].iloc[0]
    assert row["verdict"] == F.REPRODUCED
    assert (row["detail"]["w_star"], row["detail"]["fid_star"]) == (0.5, 7.0)
    assert row["detail"]["missing_w"] == [0.3] and row["numbers"].startswith("w*=0.5, FID 7;")
    assert row["numbers"].endswith("; FID missing at w = 0.3 (left out)") and "nan" not in row["numbers"]
    row = out[out["finding"] == F.FINDINGS[2]].iloc[0]
    assert row["verdict"] == F.REPRODUCED and row["detail"]["missing_w"] == [1.0]
    assert row["numbers"].endswith("; IS missing at w = 1 (left out)")
    # no FID at w = 0: nothing to measure the U's left arm against
    zero = F.check_findings(frame({0.1: ([np.nan, *U_FID[1:]], RISING_IS)}))
    assert verdict(zero, 1, "0.1") == "not testable"
    assert zero.iloc[0]["numbers"] == "no w = 0 cell with an FID in the grid; FID missing at w = 0 (left out)"
    # the frontier: the cell is on no front and out of the reference point, named; the verdict stands
    curves = frontier_curves(3.0)
    curves[0.5] = ([np.nan, *curves[0.5][0][1:]], RISING_IS)
    out = F.check_findings(frame(curves)).iloc[-1]
    assert out["verdict"] == F.REPRODUCED and out["detail"]["missing"] == ["p_uncond=0.5 w=0"]
    assert "missing FID or IS, left out: p_uncond=0.5 w=0" in out["numbers"]
    assert all(np.isfinite(v) for v in out["detail"]["hypervolume"].values())


def test_committed_embedded_default_results(tmp_path, capsys):
    df = F.load_tradeoff(ROOT / "results")
    # results/cells is a DVC output: absent from a fresh clone, present after dvc repro
    if (ROOT / "results" / "cells").is_dir():
        assert df["fid_ranges"].map(lambda v: isinstance(v, list)).all()  # the cell records were matched
    # git-tracked cell records beside a table (docs/results/fashion_mnist/cells_*.json) are always matched
    gpu = F.load_tradeoff(ROOT / "docs" / "results" / "fashion_mnist")
    assert gpu["fid_ranges"].map(lambda v: isinstance(v, list) and len(v) == 4).all()
    out = F.check_findings(df)
    ps = sorted(f"{p:g}" for p in df["p_uncond"].unique())
    for finding in (1, 2):
        assert sorted(out.loc[out["finding"] == F.FINDINGS[finding], "p_uncond"]) == ps
    assert (out["finding"] == F.FINDINGS[3]).sum() == 1
    allowed = {F.REPRODUCED, F.NOT_REPRODUCED, F.INCONCLUSIVE, F.NO_SPREAD, "not testable"}
    assert set(out["verdict"]) <= allowed
    # finding 2 verified from the data: IS rises at every w >= 0 step of every p_uncond in the table
    cells = df[df["w"] >= 0].sort_values(["p_uncond", "w"])
    if cells.groupby("p_uncond")["is"].apply(lambda s: bool(np.all(np.diff(s) > 0))).all():
        assert (out.loc[out["finding"] == F.FINDINGS[2], "verdict"] != F.NOT_REPRODUCED).all()
    # the command: a markdown table, JSON, exit code 0
    assert F.main([str(ROOT / "results" / "tradeoff.csv"), "--json", str(tmp_path / "f.json")]) == 0
    printed = capsys.readouterr().out
    assert "| finding | p_uncond | verdict | numbers |" in printed
    assert len(json.loads((tmp_path / "f.json").read_text())["findings"]) == len(out)


# ---------------------------------------------------------------- several trainings


def trainings(diffs_01: list[float], fid_sd=0.01) -> list[pd.DataFrame]:
    """Trainings of one study: FID(w = 0.1) − FID(0) is diffs_01[t] in training t (FID rising beyond w = 0.1 in
    all), each training's own sampling spread tiny (fid_sd): alone, each is decisive."""
    out = []
    for t, d in enumerate(diffs_01):
        fid = [5.0 + 0.1 * t, 5.0 + 0.1 * t + d, 8.0, 9.0, 10.0, 15.0, 20.0]
        df = frame({0.1: (fid, RISING_IS)}, fid_sd=fid_sd).assign(seed=t + 1, fid_range_mean=fid)  # own seed
        df.attrs["source"] = f"seed{t}"
        out.append(df)
    return out


def test_over_trainings_the_spread_is_the_one_between_trainings():
    diffs = [0.9, -0.3, 0.8, -0.2]  # two trainings put the minimum at w = 0, two at w = 0.1
    alone = [verdict(F.check_findings(df), 1, "0.1") for df in trainings(diffs)]
    assert alone == [F.NOT_REPRODUCED, F.REPRODUCED, F.NOT_REPRODUCED, F.REPRODUCED], "each decisive alone"
    both = F.over_trainings(trainings(diffs))
    assert both.attrs["trainings"] == 4 and both.attrs["source"] == "seed0 + seed1 + seed2 + seed3"
    # the means over trainings, each training's value a "range"
    assert both.loc[both["w"] == 0.1, "fid"].item() == pytest.approx(
        np.mean([5.0 + 0.1 * t + d for t, d in enumerate(diffs)])
    )
    assert both.loc[both["w"] == 0.0, "fid_ranges"].item() == pytest.approx([5.0, 5.1, 5.2, 5.3])
    # a training's own seed and seed-range statistics are not the mean's; class_acc (degenerate cells) is averaged
    assert "seed" not in both and "fid_range_mean" not in both
    accs = F.over_trainings([df.assign(class_acc=0.1 * (t + 1)) for t, df in enumerate(trainings(diffs))])
    assert accs["class_acc"].to_numpy() == pytest.approx(0.25)
    k = F.t_k(4)
    out = F.check_findings(both, k=k)
    assert verdict(out, 1, "0.1") == F.INCONCLUSIVE, "the trainings disagree: within their spread"
    d = out.iloc[0]["detail"]
    # w* of the mean curve is 0 (mean difference +0.3); the paired se is the sd of the trainings' differences
    assert d["w_star"] == 0.0 and d["closest_w"] == 0.1 and d["se_kind"] == "paired"
    assert d["fid_closest_minus_star"] == pytest.approx(np.mean(diffs))
    assert d["se"] == pytest.approx(np.std(diffs, ddof=1) / 2)
    # trainings that agree decide it, at Student t's k for 3 df (3.18), not 2
    agree = F.check_findings(F.over_trainings(trainings([0.9, 0.7, 0.8, 0.75])), k=k)
    assert verdict(agree, 1, "0.1") == F.NOT_REPRODUCED and agree.attrs["trainings"] == 4
    assert k == pytest.approx(3.182446, abs=1e-5) and F.t_k(5) == pytest.approx(2.776445, abs=1e-5)
    # a margin beyond 2 se but within 3.18: inconclusive at the trainings' k
    close = [0.6, 0.1, 0.5, 0.2]  # mean 0.35, se 0.119: 2.9 se
    assert verdict(F.check_findings(F.over_trainings(trainings(close)), k=k), 1, "0.1") == F.INCONCLUSIVE
    assert verdict(F.check_findings(F.over_trainings(trainings(close)), k=2.0), 1, "0.1") == F.NOT_REPRODUCED


def test_over_trainings_the_frontier_is_judged_per_training():
    # 0.5 behind in two trainings, ahead in two: each training decisive alone, together inconclusive; the
    # differences are each training's own hypervolume shares (cfg.study.frontier), averaged
    from cfg.study.frontier import hypervolume_shares

    shifts = [3.0, -2.0, 2.5, -2.5]
    tables = [frame(frontier_curves(s)) for s in shifts]
    alone = [verdict(F.check_findings(t), 3, "0.1, 0.2 vs 0.5") for t in tables]
    assert alone == [F.REPRODUCED, F.NOT_REPRODUCED, F.REPRODUCED, F.NOT_REPRODUCED]
    out = F.check_findings(F.over_trainings(tables), k=F.t_k(4)).iloc[-1]
    assert out["verdict"] == F.INCONCLUSIVE and "paired over 4 trainings" in out["numbers"]
    per = []
    for t in tables:
        c = t.sort_values(["p_uncond", "w"])
        s, _ = hypervolume_shares(c["fid"].to_numpy(), c["is"].to_numpy(), c["p_uncond"].to_numpy(), len(W))
        per.append(s[0.1] - s[0.5])
    assert out["detail"]["se"]["0.1"] == pytest.approx(np.std(per, ddof=1) / 2)
    agree = F.check_findings(
        F.over_trainings([frame(frontier_curves(s)) for s in (3.0, 2.5, 2.8)]), k=F.t_k(3)
    )
    assert agree.iloc[-1]["verdict"] == F.REPRODUCED


def test_over_trainings_refuses_what_does_not_compare():
    a, b = trainings([0.9, 0.8])
    with pytest.raises(ValueError, match="at least 2 studies, got 1"):
        F.over_trainings([a])
    other = b.assign(fingerprint="fp2")
    other.attrs["source"] = "seed1"
    with pytest.raises(F.FingerprintMismatch, match="seed0: fp, seed1: fp2"):
        F.over_trainings([a, other])
    same = b.assign(seed=1)  # a's sampling seed: the same noise through both models
    same.attrs["source"] = "seed1"
    with pytest.raises(ValueError, match=r"seed0 and seed1 were sampled with the same seed \(1\)"):
        F.over_trainings([a, same])
    short = b[b["w"] != 0.3].copy()
    short.attrs["source"] = "seed1"
    with pytest.raises(
        ValueError, match=r"seed1 has another \(p_uncond, w\) grid than seed0: missing \(0.1, 0.3\)"
    ):
        F.over_trainings([a, short])


def test_over_trainings_on_the_command_line(tmp_path, capsys):
    for t, df in enumerate(trainings([0.9, 0.7, 0.8])):
        (tmp_path / f"seed{t}").mkdir()
        df.to_csv(tmp_path / f"seed{t}" / "tradeoff.csv", index=False)
    paths = [str(tmp_path / f"seed{t}") for t in range(3)]
    assert F.main([*paths, "--json", str(tmp_path / "f.json")]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "3 trainings (the spread between them; Student t, 2 df)" in head and "> 4.3 se" in head
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["trainings"] == 3 and saved["k"] == pytest.approx(F.t_k(3))
    assert saved["findings"][0]["verdict"] == F.NOT_REPRODUCED
    # one study stays as it was: k = 2, its seed ranges
    assert F.main(paths[:1]) == 0 and "seed ranges 4; beyond the spread: > 2 se" in capsys.readouterr().out
    # mismatched studies: a clear error, no traceback
    bad = tmp_path / "other"
    bad.mkdir()
    trainings([0.9])[0].assign(fingerprint="x").to_csv(bad / "tradeoff.csv", index=False)
    with pytest.raises(SystemExit, match="not comparable"):
        F.main([paths[0], str(bad)])


def test_committed_trainings_of_the_embedded_default(capsys):
    # docs/results/embedded_default_trainings/findings.md is what the command prints on the five committed tables
    folder = ROOT / "docs" / "results" / "embedded_default_trainings"
    runs = sorted(str(p) for p in folder.glob("run*"))
    assert len(runs) == 5 and F.main(runs) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    assert rows == [
        line for line in (folder / "findings.md").read_text().splitlines() if line.startswith("|")
    ]
    assert "5 trainings (the spread between them; Student t, 4 df)" in printed
    out = F.check_findings(F.over_trainings([F.load_tradeoff(r) for r in runs]), k=F.t_k(5))
    assert set(out.loc[out["finding"] == F.FINDINGS[1], "verdict"]) == {F.REPRODUCED}
