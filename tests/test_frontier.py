"""Guidance methods compared on one protocol (cfg/study/frontier.py): hypervolume and set dominance on cases
whose answer is known by hand, and the comparison of records and of the trade-off table agreeing."""

import numpy as np
import pandas as pd
import pytest

from cfg.study.frontier import compare_methods, dominance_sentences, front_dominates, hypervolume, pareto_mask
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


def _record(guidance, options, w, fid, is_, ranges):
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
        metrics={"fid": fid, "is": is_, "fid_range_std": float(np.std(ranges[0], ddof=1))},
        fingerprint="f",
        fingerprint_detail={},
        checkpoint="c",
        ranges={"fid": ranges[0], "is": ranges[1]},
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
