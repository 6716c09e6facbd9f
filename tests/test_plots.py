"""The report's figures (cfg/study/plots.py) on the committed trade-off table: w on a symlog axis, no label
drawn over another."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from cfg.study import plots

ROOT = Path(__file__).resolve().parents[1]


def _boxes(fig, texts):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _overlapping(boxes) -> list:
    return [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


def test_w_is_on_a_symlog_axis_with_a_tick_per_grid_value_and_no_overlapping_labels():
    df = pd.read_csv(ROOT / "results" / "tradeoff.csv")
    grid = sorted(df["w"].unique())
    fig = plots.tradeoff_figure(df)
    fid_ax = fig.axes[0]
    assert fid_ax.get_xscale() == "symlog"
    assert list(fid_ax.get_xticks()) == grid
    # the grid's small values are spread out: 0.1 → 0.2 takes as much width as 0.5 → 1 (one octave each)
    x = fid_ax.transData.transform([(w, 0) for w in (0.1, 0.2, 0.5, 1.0)])[:, 0]
    assert abs((x[1] - x[0]) - (x[3] - x[2])) < 1
    labels = _boxes(fig, fid_ax.get_xticklabels())
    assert len(labels) >= len(grid) - 2 and not _overlapping(labels)
    plt.close(fig)


def test_fid_vs_is_labels_every_point_it_can_and_none_overlap():
    df = pd.read_csv(ROOT / "results" / "tradeoff.csv")
    fig = plots.tradeoff_figure(df)
    panel = fig.axes[2]
    boxes = _boxes(fig, panel.texts)
    assert not _overlapping(boxes)
    assert len(boxes) >= len(df) // 2, "most points keep their w label"
    assert {t.get_text() for t in panel.texts} >= {"-1", "4"}, "the extremes of every curve are labelled"
    plt.close(fig)


def test_a_grid_without_nonzero_w_still_draws():
    df = pd.DataFrame({"p_uncond": [0.1], "w": [0.0], "fid": [3.0], "is": [2.0]})
    fig, ax = plt.subplots()
    plots.metric_vs_w(ax, df, "fid")
    assert ax.get_xscale() == "symlog" and list(ax.get_xticks()) == [0.0]
    plt.close(fig)


def test_methods_figure_draws_degenerate_cells_as_crosses_outside_the_fronts_and_the_zoom():
    from tests.test_frontier import ABSURD, SOUND, _study

    broken = {"threshold": [(w, 900.0 + w, 1.0) for w in (0.0, 1.0, 4.0)]}
    table = pd.DataFrame([r.row() for r in _study(SOUND | ABSURD | broken)])
    fig = plots.methods_figure(table.assign(method=table["guidance"]))
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["cfg", "rescale", "apg", "threshold (every cell degenerate)"]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert sorted(len(line.get_xdata()) for line in crosses) == [0, 0, 1, 3]  # apg's w = 4, threshold's three
    assert ax.get_ylim()[1] < 100  # the zoom spans the sound fronts, not FID 900-1000
    plt.close(fig)
