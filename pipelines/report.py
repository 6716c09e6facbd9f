"""Stage `report`: the trade-off table, DVC metrics and plots, figures and a self-contained report.md."""

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from cfg.study.plots import sample_grid, tradeoff_figure
from cfg.study.report import cells_frame, markdown_table, summary
from cfg.study.stage import atomic_write_text, stage_params, write_json
from cfg.study.tracking import client_for, log_flat, provenance_tags


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
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)

    records = [
        r
        for p in params.train.p_uncond
        for r in json.loads((Path(args.cells) / f"p_uncond={p}.json").read_text())
    ]
    df = cells_frame(records)
    df.to_csv(args.table, index=False)
    clf = json.loads(Path(args.classifier_metrics).read_text())
    summ = summary(df) | {"classifier_test_accuracy": clf["test_accuracy"]}
    write_json(args.metrics, summ)

    fig = tradeoff_figure(df)
    fig.savefig(plots / "tradeoff.png", dpi=120)
    plt.close(fig)
    grids = []
    for p in params.train.p_uncond:
        image = np.asarray(Image.open(Path(args.samples) / f"p_uncond={p}" / "grid.png"))
        fig, ax = plt.subplots(
            figsize=(
                1 + 0.6 * len(params.sample.w),
                0.5 + 0.6 * image.shape[0] / image.shape[1] * len(params.sample.w),
            )
        )
        sample_grid(
            ax, image, params.sample.w, title=f"p_uncond={p:g}: one row per class, same noise in every column"
        )
        name = f"samples_p_uncond={p}.png"
        fig.savefig(plots / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        grids.append((p, name))

    per_class = [(r["p_uncond"], r["w"], r["per_class_fid"]) for r in records if r.get("per_class_fid")]
    atomic_write_text(
        args.report, _markdown(df, summ, grids, per_class, params, Path(args.report).parent, plots)
    )

    client, exp_id = client_for(params.tracking.uri, params.tracking.experiment)
    run = client.create_run(
        exp_id,
        run_name="report",
        tags=provenance_tags("report", params.section_hash("sample", "evaluate"), {"run_kind": "report"}),
    )
    log_flat(client, run.info.run_id, metrics={k: v for k, v in summ.items() if isinstance(v, float)})
    for f in sorted(plots.glob("*.png")):
        client.log_artifact(run.info.run_id, str(f), "plots")
    client.log_artifact(run.info.run_id, args.table)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "report.md").write_text(Path(args.report).read_text())
        client.log_artifact(run.info.run_id, str(Path(tmp) / "report.md"))
    client.set_terminated(run.info.run_id)
    print(markdown_table(df))
    print(
        f"[report] best FID {summ['best_fid']:.3f} at w={summ['best_fid_w']:g}, p_uncond={summ['best_fid_p_uncond']:g}; "
        f"max IS {summ['max_is']:.3f}; IS rises with w for every p_uncond: {summ['is_rises_with_w']}"
    )


def _markdown(df, summ, grids, per_class, params, report_dir: Path, plots: Path) -> str:
    rel = (
        plots.resolve().relative_to(report_dir.resolve())
        if plots.resolve().is_relative_to(report_dir.resolve())
        else plots
    )
    first = df.iloc[0]
    lines = [
        "# Classifier-free guidance: FID / IS trade-off",
        "",
        f"Data `{params.data.name}`, p_uncond ∈ {params.train.p_uncond}, w ∈ {params.sample.w}; sampler "
        f"`{first['sampler']}` with {first['steps']} steps, {summ['n_samples']} samples per cell; features from "
        f"`{first['extractor']}` (evaluation classifier test accuracy {summ['classifier_test_accuracy']:.4f}).",
        "",
        f"- Best FID **{summ['best_fid']:.3f}** at w = {summ['best_fid_w']:g}, p_uncond = {summ['best_fid_p_uncond']:g}.",
        f"- Largest IS **{summ['max_is']:.3f}** at w = {summ['max_is_w']:g}, p_uncond = {summ['max_is_p_uncond']:g}.",
        f"- IS rises monotonically with w for every p_uncond: **{summ['is_rises_with_w']}** "
        f"({', '.join(f'{k}: {v}' for k, v in summ['is_rises_with_w_by_p_uncond'].items())}).",
        "",
        f"![trade-off]({rel}/tradeoff.png)",
        "",
        "## Trade-off table",
        "",
        markdown_table(
            df,
            [
                c
                for c in [
                    "p_uncond",
                    "w",
                    "fid",
                    "fid_range_std",
                    "is",
                    "kid",
                    "precision",
                    "recall",
                    "class_acc",
                    "n_samples",
                ]
                if c in df and df[c].notna().any()
            ],
        ),
        "",
        "## Samples",
        "",
    ]
    lines += [f"![p_uncond={p:g}]({rel}/{name})" for p, name in grids]
    if per_class:
        lines += ["", "## Per-class FID", ""]
        for p, w, pcf in per_class:
            lines.append(f"- p_uncond={p:g}, w={w:g}: " + ", ".join(f"{c}: {v:.2f}" for c, v in pcf.items()))
    lines += [
        "",
        "## Provenance",
        "",
        f"- metric fingerprint `{summ['fingerprint']}` (extractor, weights hash, reference statistics, sample count, "
        "resolution, resize): every row of the table shares it",
        f"- MLflow experiment `{params.tracking.experiment}`: one run per trained model with one nested run per "
        "cell (`mlflow_run_id` column), tagged with the git commit, DVC stage and parameters hash",
        f"- checkpoints: {', '.join(sorted(df['checkpoint'].unique()))}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
