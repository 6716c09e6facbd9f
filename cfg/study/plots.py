"""Trade-off figures, each a function drawing on a given matplotlib Axes (used by the report and notebooks)."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display needed; notebooks still render inline

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402


def _palette(df: pd.DataFrame) -> dict:
    ps = sorted(df["p_uncond"].unique())
    return dict(zip(ps, sns.color_palette("viridis", len(ps)), strict=True))


def metric_vs_w(
    ax: Axes, df: pd.DataFrame, metric: str, err: str | None = None, label: str | None = None
) -> Axes:
    """One line per p_uncond of `metric` against w; `err` names a column drawn as ±1 error bars."""
    colors = _palette(df)
    for p, g in df.sort_values("w").groupby("p_uncond"):
        ax.plot(g["w"], g[metric], "o-", color=colors[p], label=f"p_uncond={p:g}", ms=4)
        if err and err in g and g[err].notna().any():
            ax.errorbar(g["w"], g[metric], yerr=g[err], fmt="none", ecolor=colors[p], capsize=3, alpha=0.7)
    ax.set_ylabel(label or metric.upper())
    w_axis(ax, df["w"])
    ax.legend(frameon=False)
    return ax


def w_axis(ax: Axes, w_values) -> Axes:
    """w on a symlog axis: linear within the smallest non-zero |w| of the grid, logarithmic beyond, so a grid
    such as [-1, 0, 0.1, 0.2, 0.3, 0.5, 1, 4] spreads out instead of crowding into [0, 0.5]. A tick at every
    w of the grid, labelled where the label clears the last labelled one (widths estimated from the font)."""
    w = np.unique(np.asarray(w_values, dtype=float))
    nonzero = np.abs(w[w != 0])
    linthresh = float(nonzero.min()) if len(nonzero) else 1.0
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.4)
    ax.set_xticks(w, [f"{v:g}" for v in w])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.tick_params(axis="x", labelsize=8)
    if len(w) > 1:
        ax.set_xlim(*_padded(ax, w[0], w[-1]))
        to_px = ax.figure.dpi / 72
        scaled = ax.xaxis.get_transform().transform(w)
        lo, hi = ax.xaxis.get_transform().transform(np.array(ax.get_xlim()))
        px = (scaled - lo) / (hi - lo) * ax.get_window_extent().width
        half = [(0.6 * len(f"{v:g}") * 8 * to_px) / 2 for v in w]  # half a label's width
        last = None
        for i, tick in enumerate(ax.xaxis.get_major_ticks()):
            keep = last is None or px[i] - px[last] >= half[i] + half[last] + 3 * to_px
            tick.label1.set_visible(keep)
            last = i if keep else last
    ax.set_xlabel("guidance strength w (symlog axis)")
    ax.axvline(0, color="0.7", lw=0.8, ls="--")
    return ax


def _padded(ax: Axes, lo: float, hi: float, pad: float = 0.04) -> tuple[float, float]:
    """[lo, hi] widened by `pad` of its width on the axis' own scale."""
    t = ax.xaxis.get_transform()
    a, b = t.transform(np.array([lo, hi]))
    return tuple(t.inverted().transform(np.array([a - pad * (b - a), b + pad * (b - a)])))


def fid_vs_is(ax: Axes, df: pd.DataFrame, annotate_w: bool = True) -> Axes:
    """FID against IS, one curve per p_uncond, points labelled with w (as Figure 4 of Ho & Salimans)."""
    colors = _palette(df)
    for p, g in df.sort_values("w").groupby("p_uncond"):
        ax.plot(g["is"], g["fid"], "o-", color=colors[p], label=f"p_uncond={p:g}", ms=4)
    ax.set_xlabel("IS (higher: more fidelity)")
    ax.set_ylabel("FID (lower: closer to data)")
    ax.legend(frameon=False)
    if annotate_w:
        _annotate_w(ax, df, colors)
    return ax


# where a w label may sit relative to its point, in points, tried in this order
_LABEL_OFFSETS = ((4, 3), (4, -9), (-5, 3), (-5, -9), (4, 9), (-5, 9), (4, -15), (-5, -15))


def _annotate_w(ax: Axes, df: pd.DataFrame, colors: dict, fontsize: float = 7) -> int:
    """Label the (IS, FID) points of df with their w where a label fits: each label takes the first place
    beside its point (_LABEL_OFFSETS) that overlaps no label placed before it and no other point; a point
    with no such place stays unlabelled. Call after everything else is drawn (it reads the axes' limits).
    Returns how many points went unlabelled."""
    fig = ax.figure
    ax.autoscale_view()
    to_px = fig.dpi / 72
    points = ax.transData.transform(df[["is", "fid"]].to_numpy(dtype=float))  # (N, 2) pixels
    placed: list[tuple[float, float, float, float]] = []
    skipped = 0

    def free(box) -> bool:
        x0, y0, x1, y1 = box
        clear_of_labels = all(x1 < a0 or x0 > a1 or y1 < b0 or y0 > b1 for a0, b0, a1, b1 in placed)
        radius = 3 * to_px  # a marker
        return clear_of_labels and not any(
            x0 - radius < px < x1 + radius and y0 - radius < py < y1 + radius for px, py in points
        )

    for (_, r), (px, py) in zip(df.iterrows(), points, strict=True):
        text = f"{r['w']:g}"
        # the text's size estimated from the font size (0.6 em per character, 1 em high), with a margin
        width, height = (0.6 * len(text) + 0.4) * fontsize * to_px, 1.2 * fontsize * to_px
        for dx, dy in _LABEL_OFFSETS:
            x0 = px + dx * to_px - (width if dx < 0 else 0)
            y0 = py + dy * to_px
            box = (x0, y0, x0 + width, y0 + height)
            if free(box):
                placed.append(box)
                ax.annotate(
                    text,
                    (r["is"], r["fid"]),
                    textcoords="offset points",
                    xytext=(dx, dy),
                    ha="right" if dx < 0 else "left",
                    va="bottom",
                    fontsize=fontsize,
                    color=colors[r["p_uncond"]],
                )
                break
        else:
            skipped += 1
    return skipped


def sample_grid(ax: Axes, image: np.ndarray, w_values: list[float], title: str = "") -> Axes:
    """A class-by-w sample grid image, columns labelled with their w."""
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    n = len(w_values)
    width = image.shape[1]
    ax.set_xticks([(i + 0.5) * width / n for i in range(n)], [f"{w:g}" for w in w_values], fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("w")
    ax.set_title(title)
    return ax


def tradeoff_figure(df: pd.DataFrame) -> plt.Figure:
    """The report's three panels: FID vs w, IS vs w, FID vs IS."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metric_vs_w(axes[0], df, "fid", err=_spread(df, "fid_range_std"), label="FID")
    metric_vs_w(axes[1], df, "is", err=_spread(df, "is_range_std"), label="IS")
    fid_vs_is(axes[2], df, annotate_w=False)
    fig.tight_layout()
    _annotate_w(axes[2], df.sort_values(["p_uncond", "w"]), _palette(df))  # in the final layout's pixels
    return fig


def _spread(df: pd.DataFrame, *columns: str) -> str | None:
    """The first of `columns` that df has with a value: the error bars of a panel (None: no bars)."""
    return next((c for c in columns if c in df and df[c].notna().any()), None)


# metric -> (columns that may hold its ±1 standard deviation, the first present is drawn; what it is over)
UNCERTAINTY = {
    "fid": (("fid_range_std",), "sd of FID over disjoint seed ranges"),
    "fid_range_mean": (("fid_range_std",), "sd over disjoint seed ranges"),
    "is": (("is_range_std",), "sd of IS over disjoint seed ranges"),
    "is_range_mean": (("is_range_std",), "sd over disjoint seed ranges"),
    "kid_x1e3": (("kid_x1e3_std",), "sd over KID subsets"),
}


def metric_with_uncertainty(ax: Axes, df: pd.DataFrame, metric: str) -> Axes:
    """`metric` against w, one line per p_uncond, with ±1 sd error bars and a shaded band (UNCERTAINTY)."""
    if metric not in UNCERTAINTY:
        raise ValueError(f"no uncertainty column known for {metric!r}; known: {sorted(UNCERTAINTY)}")
    columns, what = UNCERTAINTY[metric]
    err = _spread(df, *columns) or columns[0]
    metric_vs_w(ax, df, metric, err=err, label=f"{metric.upper()} ± 1 sd")
    if err in df and df[err].notna().any():
        colors = _palette(df)
        for p, g in df.sort_values("w").groupby("p_uncond"):
            lo, hi = g[metric] - g[err].fillna(0), g[metric] + g[err].fillna(0)
            ax.fill_between(g["w"], lo, hi, color=colors[p], alpha=0.15, lw=0)
    recorded = err in df and df[err].notna().any()
    zero = recorded and (df[err].fillna(0) == 0).all()
    ax.set_title(
        f"{what}: not recorded" if not recorded else f"{what}: all zero" if zero else what, fontsize=9
    )
    return ax


def uncertainty_figure(df: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> plt.Figure:
    """One panel per metric against w with its ±1 sd (metric_with_uncertainty); default: those of fid, is and
    kid_x1e3 that df has."""
    metrics = metrics or tuple(m for m in ("fid", "is", "kid_x1e3") if m in df)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        metric_with_uncertainty(ax, df, metric)
    fig.tight_layout()
    return fig


def pareto_frontier(ax: Axes, df: pd.DataFrame, pareto: str = "pareto") -> Axes:
    """FID against IS per p_uncond: every cell hollow and labelled with w, the cells where the boolean column
    `pareto` is true (the FID-vs-IS Pareto front) filled and joined in IS order."""
    colors = _palette(df)
    for p, g in df.sort_values("w").groupby("p_uncond"):
        c = colors[p]
        ax.plot(g["is"], g["fid"], "o", mfc="none", color=c, ms=6, alpha=0.6)
        front = g[g[pareto].astype(bool)].sort_values("is")
        ax.plot(front["is"], front["fid"], "o-", color=c, ms=6, lw=1.5, label=f"p_uncond={p:g}")
    ax.set_xlabel("IS (higher: more fidelity)")
    ax.set_ylabel("FID (lower: closer to data)")
    ax.set_title("Pareto fronts (filled), points labelled with w where the label fits", fontsize=9)
    ax.legend(frameon=False)
    _annotate_w(ax, df.sort_values(["p_uncond", "w"]), colors)
    return ax


def normalised_metric_vs_w(
    ax: Axes,
    df: pd.DataFrame,
    metric: str = "fid",
    reference: pd.DataFrame | None = None,
    reference_label: str = "paper",
) -> Axes:
    """`metric` rescaled to [0, 1] per p_uncond curve (min to max) against w, so curves of different data sets
    compare on shape: ours solid, `reference` (same columns, e.g. the paper's Table 1) dashed."""
    both = (
        df
        if reference is None
        else pd.concat([df[["p_uncond", "w", metric]], reference[["p_uncond", "w", metric]]])
    )
    colors = _palette(both)
    for frame, style, who in ((df, "o-", "ours"), (reference, "s--", reference_label)):
        if frame is None:
            continue
        for p, g in frame.sort_values("w").groupby("p_uncond"):
            span = g[metric].max() - g[metric].min()
            y = (g[metric] - g[metric].min()) / span if span > 0 else g[metric] * 0
            ax.plot(g["w"], y, style, color=colors[p], ms=3, label=f"{who} p_uncond={p:g}", alpha=0.9)
    ax.set_ylabel(f"{metric.upper()} (min-max normalised per curve)")
    w_axis(ax, both["w"])
    ax.legend(frameon=False, fontsize=7)
    return ax


def methods_figure(df: pd.DataFrame) -> plt.Figure:
    """FID against IS, one panel per p_uncond, one colour per guidance method (column `method`): every cell
    hollow and labelled with w, each method's Pareto front filled and joined in IS order. Degenerate cells
    (`cfg.study.frontier.degenerate_rows`) are crosses, outside the fronts and the zoom; a method with no other
    cell says so in the legend."""
    from cfg.study.frontier import degenerate_rows, pareto_mask

    ps = sorted(df["p_uncond"].unique())
    methods = list(dict.fromkeys(df["method"]))
    colors = dict(zip(methods, sns.color_palette("tab10", len(methods)), strict=True))
    bad = degenerate_rows(df)
    fig, axes = plt.subplots(1, len(ps), figsize=(6 * len(ps), 4.8), squeeze=False)
    for ax, p in zip(axes[0], ps, strict=True):
        fronts = []
        for m in methods:
            mine = (df["p_uncond"] == p) & (df["method"] == m)
            g, off = df[mine & ~bad].sort_values("w"), df[mine & bad]
            c = colors[m]
            ax.plot(g["is"], g["fid"], "o", mfc="none", color=c, ms=5, alpha=0.6)
            ax.plot(off["is"], off["fid"], "x", color=c, ms=5, alpha=0.6)
            front = g[pareto_mask(g["fid"].to_numpy(), g["is"].to_numpy())].sort_values("is")
            label = m if len(g) else f"{m} (every cell degenerate)"
            ax.plot(front["is"], front["fid"], "o-", color=c, ms=5, lw=1.5, label=label)
            fronts.append(front)
            for _, r in pd.concat([g, off]).iterrows():
                ax.annotate(
                    f"{r['w']:g}",
                    (r["is"], r["fid"]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                    color=c,
                )
        ax.set_xlabel("IS (higher: more fidelity)")
        ax.set_ylabel("FID (lower: closer to data)")
        # zoom on the fronts (a method's far-off cells would squeeze them into a corner)
        both = pd.concat(fronts)
        if len(both):
            span_is, span_fid = np.ptp(both["is"]) or 1.0, np.ptp(both["fid"]) or 1.0
            ax.set_xlim(both["is"].min() - 0.15 * span_is, both["is"].max() + 0.1 * span_is)
            ax.set_ylim(max(0.0, both["fid"].min() - 0.1 * span_fid), both["fid"].max() + 0.15 * span_fid)
        title = f"p_uncond={p:g}: Pareto fronts (filled) per guidance method; axes span the fronts"
        if (bad & (df["p_uncond"] == p)).any():
            title += "\nx: degenerate cells (cfg.eval.sanity), left out of the fronts"
        ax.set_title(title, fontsize=9)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
