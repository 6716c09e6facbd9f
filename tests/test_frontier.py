"""Guidance methods compared on one protocol (cfg/study/frontier.py): hypervolume, its reference point and set
dominance on cases whose answer is known by hand, degenerate cells named and kept out of the comparison, and the
comparison of records and of the trade-off table agreeing."""

import numpy as np
import pandas as pd
import pytest

from cfg.study.frontier import (
    compare_methods,
    dominance_sentences,
    front_dominates,
    hypervolume,
    pareto_mask,
    reference_point,
)
from cfg.study.records import CellRecord


def test_hypervolume_of_staircases_by_hand():
    # reference (IS 0, FID 10): one point (IS 2, FID 4) dominates a 2 x 6 rectangle
    assert hypervolume(np.array([4.0]), np.array([2.0]), 10.0, 0.0) == pytest.approx(12.0)
    # two points: union of [0, 2] x [4, 10] and [0, 3] x [7, 10] = 12 + 1 x 3
    assert hypervolume(np.array([4.0, 7.0]), np.array([2.0, 3.0]), 10.0, 0.0) == pytest.approx(15.0)
    # a dominated point adds nothing, a point beyond the reference counts nothing
    assert hypervolume(np.array([4.0, 5.0, 11.0]), np.array([2.0, 1.0, 5.0]), 10.0, 0.0) == pytest.approx(
        12.0
    )
    assert pareto_mask(np.array([4.0, 5.0, 7.0]), np.array([2.0, 1.0, 3.0])).tolist() == [True, False, True]


def test_front_dominance_is_a_set_relation():
    a = np.array([[4.0, 2.0], [7.0, 3.0]])  # (fid, is)
    assert front_dominates(a, np.array([[5.0, 2.0], [7.0, 2.5]]))
    assert not front_dominates(a, a)  # weakly, not strictly
    assert not front_dominates(a, np.array([[3.0, 1.0]]))  # a lower FID than any of a's
    assert not front_dominates(np.array([[3.0, 1.0]]), a)


def _record(guidance, options, w, fid, is_, ranges, class_acc=None):
    return CellRecord(
        p_uncond=0.2,
        w=w,
        guidance=guidance,
        guidance_options=options,
        sampler="ddim",
        sampler_options={},
        steps=8,
        seed=1,
        n_samples=100,
        extractor="classifier",
        metrics={"fid": fid, "is": is_, "fid_range_std": float(np.std(ranges[0], ddof=1))}
        | ({} if class_acc is None else {"class_acc": class_acc}),
        fingerprint="f",
        fingerprint_detail={},
        checkpoint="c",
        ranges={"fid": ranges[0], "is": ranges[1]},
        chance_acc=0.1,  # 10 balanced classes: near chance below 0.325 at n = 100 (cfg.eval.sanity)
        noise_fid=1400.0,  # no better than noise from FID 700
    )


def test_compare_methods_ranks_a_uniformly_better_method_first():
    ws = [0.0, 1.0, 4.0]
    cfg = [(10.0, 3.0), (8.0, 5.0), (12.0, 8.0)]
    better = [(f - 1.0, i + 0.5) for f, i in cfg]  # every cell: lower FID, higher IS
    records = [
        _record(g, o, w, f, i, ([f - 0.2, f + 0.2], [i - 0.1, i + 0.1]))
        for g, o, cells in (("cfg", {}, cfg), ("apg", {"eta": 0.0}, better))
        for w, (f, i) in zip(ws, cells, strict=True)
    ]
    table = compare_methods(records).set_index("method")
    assert list(table.index) == ["cfg", "apg eta=0"]
    assert table.loc["apg eta=0", "dominates"] == "cfg" and table.loc["cfg", "dominated_by"] == "apg eta=0"
    assert table.loc["apg eta=0", "hypervolume"] > table.loc["cfg", "hypervolume"]
    assert table.loc["cfg", "best_fid"] == 8.0 and table.loc["cfg", "best_fid_w"] == 1.0
    assert table.loc["cfg", "best_fid_sd"] == pytest.approx(np.std([7.8, 8.2], ddof=1))
    assert table.loc["cfg", "hypervolume_sd"] > 0  # two seed ranges, different fronts
    assert table.loc["cfg", "pareto_w"] == [1.0, 4.0]  # (FID 10, IS 3) at w = 0 is dominated by w = 1
    # from the trade-off table: the same fronts and numbers, without the per-range spread
    frame = pd.DataFrame([r.row() for r in records])
    again = compare_methods(frame).set_index("method")
    for col in ("best_fid", "hypervolume", "dominates", "dominated_by"):
        assert again[col].tolist() == table[col].tolist(), col
    assert again["hypervolume_sd"].isna().all()
    lines = dominance_sentences(compare_methods(records))
    assert "dominates `cfg`" in lines[1] and "best FID -1.000 against cfg (beyond" in lines[1]


# (w, FID, IS) of three methods by hand. Joint Pareto front of the two sound ones: (10, 5) (12, 7) (14, 7.5)
# (16, 9); ideal (FID 10, IS 9), nadir (16, 5); 3 w per method: the reference 1 / (3 - 1) of the span beyond
# the nadir, (10 + 1.5 * 6, 9 - 1.5 * 4) = (19, 3), box (19 - 10) * (9 - 3) = 54.
SOUND = {
    "cfg": [(0.0, 10.0, 5.0), (1.0, 12.0, 7.0), (4.0, 20.0, 8.0)],
    "rescale": [(0.0, 11.0, 4.0), (1.0, 14.0, 7.5), (4.0, 16.0, 9.0)],
}
# a method whose w = 4 cell is absurd and degenerate (class accuracy at chance, FID near noise's), as APG with
# its authors' defaults at w = 4 on the digits; its other cells lie behind the joint front
ABSURD = {"apg": [(0.0, 13.0, 6.0), (1.0, 15.0, 6.5), (4.0, 1000.0, 1.0)]}


def _study(methods: dict) -> list[CellRecord]:
    return [
        _record(g, {}, w, f, i, ([f - 0.5, f + 0.5], [i - 0.1, i + 0.1]), class_acc=0.1 if f > 700 else 0.9)
        for g, cells in methods.items()
        for w, f, i in cells
    ]


def test_reference_point_is_beyond_the_joint_fronts_nadir():
    fid, is_ = np.array([10.0, 12.0, 20.0, 11.0, 14.0, 16.0]), np.array([5.0, 7.0, 8.0, 4.0, 7.5, 9.0])
    assert reference_point(fid, is_, 3) == pytest.approx((19.0, 3.0, 10.0, 9.0))
    # one point dominating all: the span of all cells stands in for the front's
    assert reference_point(np.array([1.0, 3.0]), np.array([5.0, 4.0]), 2) == pytest.approx(
        (5.0, 3.0, 1.0, 5.0)
    )


def test_hypervolume_shares_by_hand_and_an_absurd_degenerate_cell_moves_nothing():
    sound = compare_methods(_study(SOUND)).set_index("method")
    table = compare_methods(_study(SOUND | ABSURD)).set_index("method")
    # cfg: (20, 8) lies beyond FID 19; (12, 7) adds 2 x (19 - 12), (10, 5) adds 2 x (19 - 10): 32 of 54
    # rescale: 1.5 x 3 + 3.5 x 5 + 1 x 8 = 30 of 54; apg's two sound cells: 0.5 x 4 + 3 x 6 = 20 of 54
    expected = {"cfg": 32 / 54, "rescale": 30 / 54, "apg": 20 / 54}
    for m, hv in expected.items():
        assert table.loc[m, "hypervolume"] == pytest.approx(hv), m
    # the absurd cell set the reference before (FID 1000: every share ~0.99); now it is left out
    for m in SOUND:
        assert table.loc[m, "hypervolume"] == pytest.approx(sound.loc[m, "hypervolume"])
    assert (table["ref_fid"].tolist(), table["ref_is"].tolist()) == ([19.0] * 3, [3.0] * 3)
    # the degenerate cell is named, and out of apg's frontier, best FID and dominance; apg is not dropped
    assert table.loc["apg", "degenerate_w"] == [4.0] and table.loc["cfg", "degenerate_w"] == []
    assert table.loc["apg", "n_w"] == 3 and table.loc["apg", "pareto_w"] == [0.0, 1.0]
    assert (
        table.loc["apg", "dominated_by"] == "cfg"
    )  # (12, 7) beats (13, 6) and (15, 6.5); rescale not (13, 6)
    lines = dominance_sentences(table.reset_index())
    assert "`apg`: hypervolume 0.370" in lines[2] and "degenerate at w = 4 (left out" in lines[2]
    assert "hypervolume -0.037 against cfg" in lines[1]
    # from the trade-off table: the same degenerate cell found from its class_acc / chance_acc / noise_fid columns
    again = compare_methods(pd.DataFrame([r.row() for r in _study(SOUND | ABSURD)])).set_index("method")
    assert again["degenerate_w"].tolist() == table["degenerate_w"].tolist()
    assert again["hypervolume"].tolist() == pytest.approx(table["hypervolume"].tolist())


def test_a_method_with_only_degenerate_cells_is_reported_not_dropped():
    broken = {"threshold": [(w, 900.0 + w, 1.0) for w in (0.0, 1.0, 4.0)]}
    table = compare_methods(_study(SOUND | broken)).set_index("method")
    assert table.loc["threshold", "degenerate_w"] == [0.0, 1.0, 4.0]
    assert np.isnan(table.loc["threshold", "hypervolume"]) and np.isnan(table.loc["threshold", "best_fid"])
    assert table.loc["cfg", "hypervolume"] == pytest.approx(32 / 54)
    assert table.loc["cfg", "dominates"] == ""  # no cell of threshold is left to dominate
    line = dominance_sentences(table.reset_index())[-1]
    assert (
        line
        == "p_uncond=0.2, `threshold`: every cell degenerate (w = 0, 1, 4): no frontier, compared with nothing"
    )
