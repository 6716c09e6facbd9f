"""Stage `evaluate`: metrics of every (p_uncond, w) cell, one MLflow run per cell nested under its model."""

import argparse
from pathlib import Path

from cfg.engine.distributed import finish, init, launch, n_processes
from cfg.eval.cells import evaluate_samples, metrics_from_params
from cfg.eval.sanity import degenerate_cells, describe, noise_fid
from cfg.eval.stats import load_reference_stats
from cfg.log import get_logger, setup
from cfg.progress import Progress
from cfg.study.records import SampleSet, p_uncond_name, write_cells
from cfg.study.stage import make_extractor, stage_params
from cfg.study.tracking import Tracker, log_cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", required=True, help="folder holding p_uncond=<p>/samples.pt")
    ap.add_argument("--classifier", required=True, help="evaluation classifier (class accuracy)")
    ap.add_argument("--reference", required=True, help="reference statistics of the test set")
    ap.add_argument("--out-dir", required=True, help="folder for p_uncond=<p>.json cell records")
    args = ap.parse_args()
    setup()
    params = stage_params()
    e = params.evaluate
    launch(
        n_processes(params.sample.devices, params.train.device, "sample.devices")
    )  # under torchrun when sample.devices > 1
    d, device = init(params.train.device)

    reference = load_reference_stats(args.reference)
    extractor = make_extractor(e.extractor, args.classifier, e.inception_weights, device)
    # class accuracy always uses the evaluation classifier, whichever network gives the features
    classifier = (
        extractor
        if e.extractor == "classifier"
        else make_extractor("classifier", args.classifier, None, device)
    )
    # the store answers, or exit now; rank 0 alone logs and writes (every rank scores the gathered features)
    tracker = Tracker.open("evaluate", params.tracking.experiment) if d.main else None
    params_hash = params.section_hash("sample", "evaluate")

    log = get_logger("evaluate")
    cells = len(params.train.p_uncond) * len(params.sample.guidance) * len(params.sample.w)
    progress = Progress(f"evaluate on {device.type}", cells, "cells", every_s=0)
    noise, every, scored = None, [], [0]  # scored: cells so far, for the progress lines
    for p in params.train.p_uncond:
        samples = SampleSet.load(Path(args.samples) / p_uncond_name(p) / "samples.pt")
        if noise is None:  # every model has as many samples of the same shape: one baseline for the study
            noise = noise_fid(
                extractor,
                reference,
                samples.n_samples,
                tuple(samples.images.shape[2:]),
                seed=samples.seed,
                batch_size=e.batch_size,
                device=device,
            )
            if d.main:
                log.info(f"FID of {samples.n_samples} uniform-noise images: {noise:.4g}")

        def log_cell_and_progress(record, images, samples=samples):
            record.mlflow_run_id = log_cell(
                tracker, record, images, samples.labels, samples.classes, params_hash
            )
            m = record.metrics
            shown = "  ".join(f"{k} {v:.4g}" for k, v in m.items() if not k.endswith(("_std", "_mean")))
            scored[0] += 1
            progress.update(scored[0], f"{record.name.removeprefix('cell ')}: {shown}")

        records = evaluate_samples(
            samples,
            extractor,
            reference,
            metrics=metrics_from_params(e),
            classifier=classifier,
            extractor_name=e.extractor,
            seed_ranges=e.seed_ranges,
            per_class_w=e.per_class_w,
            noise_fid=noise,
            batch_size=e.batch_size,
            device=device,
            on_cell=log_cell_and_progress if d.main else None,
            dist=d,
        )
        if d.main:
            write_cells(Path(args.out_dir) / f"{p_uncond_name(p)}.json", records)
        every += records
    if not d.main:
        return finish(d)
    tracker.finish()
    for line in describe(degenerate_cells(every), len(every)):
        log.warning(line)
    finish(d)


if __name__ == "__main__":
    main()
