"""Stage `report`: the trade-off table, DVC metrics and plots, figures and a self-contained report.md."""

import argparse
import json
import sys
from pathlib import Path

from cfg.eval.sanity import describe
from cfg.study.records import p_uncond_name, read_study_cells
from cfg.study.report import markdown_table, write_report
from cfg.study.stage import stage_params
from cfg.study.tracking import Tracker, log_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", required=True, help="folder of p_uncond=<p>.json cell records")
    ap.add_argument("--samples", required=True, help="folder holding p_uncond=<p>/grid.png")
    ap.add_argument("--classifier-metrics", required=True, help="classifier stage's metrics JSON")
    ap.add_argument("--table", required=True, help="output CSV, one row per (p_uncond, w)")
    ap.add_argument("--metrics", required=True, help="output DVC metrics JSON")
    ap.add_argument("--plots", required=True, help="output folder of figures")
    ap.add_argument("--report", required=True, help="output markdown report")
    args = ap.parse_args()
    params = stage_params()

    records = read_study_cells(args.cells, params.train.p_uncond)
    df, summ = write_report(
        records,
        grid_images={p: Path(args.samples) / p_uncond_name(p) / "grid.png" for p in params.train.p_uncond},
        classifier_accuracy=json.loads(Path(args.classifier_metrics).read_text())["test_accuracy"],
        data_name=params.data.name,
        experiment=params.tracking.experiment,
        table=Path(args.table),
        metrics=Path(args.metrics),
        plots=Path(args.plots),
        report=Path(args.report),
    )
    tracker = Tracker.open("report", params.tracking.experiment)
    log_report(
        tracker,
        summ,
        params.section_hash("sample", "evaluate"),
        Path(args.plots),
        Path(args.table),
        Path(args.report),
    )
    tracker.finish()
    print(markdown_table(df))
    print(
        f"[report] best FID {summ['best_fid']:.3f} at w={summ['best_fid_w']:g}, p_uncond={summ['best_fid_p_uncond']:g}; "
        f"max IS {summ['max_is']:.3f}; IS rises with w for every p_uncond: {summ['is_rises_with_w']}"
    )
    for line in describe(summ["degenerate_cells"], summ["n_cells"]):
        print(f"[report] WARNING: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
