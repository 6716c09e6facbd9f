"""Evaluate a model's samples: one `CellRecord` per (guidance method, w), from (samples, extractor, reference
statistics).

The evaluate stage and the search both score through `evaluate_samples`, so a trial's FID is the pipeline's.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from cfg.engine.distributed import Dist, gather_rows, shard
from cfg.eval.features import FeatureExtractor, Features, extract_features
from cfg.eval.fingerprint import fingerprint
from cfg.eval.metrics import METRICS, per_class_fid
from cfg.eval.sanity import chance_accuracy
from cfg.eval.stats import ReferenceStats
from cfg.study.records import CellRecord, SampleSet

# metrics whose spread over disjoint seed ranges a record carries (`<name>_range_mean`, `<name>_range_std`)
RANGE_METRICS = ("fid", "is")


def score(
    gen: Features,
    labels: Tensor,  # (N,) int64: the classes the samples were conditioned on
    ref: ReferenceStats,
    metrics: dict[str, dict],  # METRICS entry -> its resolved options
    *,
    class_logits: Tensor | None,  # (N, K) logits of the evaluation classifier
    seed: int = 0,  # KID subsets and IS shuffling
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Every metric's columns for one set of generated features, in registry order."""
    out: dict[str, float] = {}
    for name, options in metrics.items():
        out |= METRICS[name](
            gen, ref, labels=labels, class_logits=class_logits, seed=seed, device=device, **options
        )
    return out


def _seed_ranges(
    gen: Features, labels: Tensor, ref: ReferenceStats, metrics: dict, ranges: int, **kw
) -> tuple[dict[str, float], dict[str, list[float]], int]:
    """RANGE_METRICS on `ranges` disjoint example ranges (independent noise, n / R samples each):
    (mean and sd columns, the values per range, samples per range)."""
    index = torch.arange(len(gen))
    parts = [torch.isin(index, r) for r in index.chunk(ranges)]
    # FID's bias depends on the count: the ranges must be of one size to give a spread (the schema refuses other
    # sample counts); the classes' mix moves it too, which the schema checks where it knows the data's classes
    sizes = [int(p.sum()) for p in parts]
    if len(parts) != ranges or len(set(sizes)) > 1:
        raise ValueError(
            f"{len(gen)} samples do not split into {ranges} seed ranges of equal size (torch.chunk gives {sizes} "
            f"samples); give a multiple of {ranges}, and of {ranges} x the number of classes for equal class mixes"
        )
    classes = int(labels.max()) + 1 if len(labels) else 0
    counts = [labels[p].bincount(minlength=classes).tolist() for p in parts]
    if any(c != counts[0] for c in counts):
        warnings.warn(
            f"the {ranges} seed ranges of {sizes[0]} samples hold the {classes} classes in other proportions "
            f"({counts}), which their spread mixes in; give a multiple of {ranges * classes} samples",
            RuntimeWarning,
            stacklevel=3,
        )
    wanted = {m: metrics[m] for m in RANGE_METRICS if m in metrics}
    per = [score(gen.select(p), labels[p], ref, wanted, class_logits=None, **kw) for p in parts]
    values = {m: [s[m] for s in per] for m in wanted}
    columns = {}
    for m, v in values.items():
        columns[f"{m}_range_mean"] = statistics.mean(v)
        columns[f"{m}_range_std"] = statistics.stdev(v)
    return columns, values, int(parts[0].sum())


def evaluate_samples(
    samples: SampleSet,
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    *,
    metrics: dict[str, dict],  # METRICS entry -> resolved options (cfg.study.config: evaluate.metrics)
    classifier: FeatureExtractor | None = None,  # for class_acc when the extractor is not the classifier
    extractor_name: str = "classifier",  # the extractor's registry name, recorded
    seed_ranges: int = 1,  # > 1: also score this many disjoint example ranges (the spread over seeds)
    per_class_w: float | None = None,  # the w whose cell also gets per-class FID
    noise_fid: float | None = None,  # FID of as many noise images (cfg.eval.sanity.noise_fid), recorded
    batch_size: int = 500,  # images per extractor batch
    device: torch.device | str = "cpu",
    on_cell: Callable[[CellRecord, Tensor], None] | None = None,  # called with each record and its images
    dist: Dist | None = None,  # several processes: each extracts its shard's features; all get every record
) -> list[CellRecord]:
    """One record per (guidance method, w) row of `samples`, in their order (the same numbers for any number
    of processes).

    With several processes each extracts its shard of every row's features (gathered on every rank), and the
    rows' scoring (FID, KID's subsets, the k-NN distances of precision/recall, each seed range again) is dealt
    out: row j is scored by rank j mod world, and the records are gathered at the end, where `on_cell` then
    sees them in order. Scoring every row on every rank took 6.5 min for the Fashion-MNIST preset's 45 rows
    on 4 GPUs, all of it done four times over."""
    d = dist or Dist()
    rows = shard(samples.n_samples, d, block=batch_size)  # whole extractor batches, as one process runs them

    def features(net: FeatureExtractor, images: Tensor) -> Features:
        f = extract_features(
            net, images[rows] if d.world > 1 else images, batch_size=batch_size, device=device
        )
        n = samples.n_samples
        gather = {"d": d, "n": n, "block": batch_size}
        return replace(f, features=gather_rows(f.features, **gather), logits=gather_rows(f.logits, **gather))

    mine: list[tuple[int, CellRecord]] = []  # (row, record) of the rows this rank scores
    chance = chance_accuracy(samples.labels)
    for j, w in enumerate(samples.w):
        images = samples.images[j]  # (N, C, H, W) uint8
        gen = features(extractor, images)  # a collective: every rank takes part for every row
        logits = gen.logits
        if classifier is not None and classifier is not extractor:
            logits = features(classifier, images).logits
        if j % d.world != d.rank:
            continue
        kw = {"seed": samples.seed, "device": device}
        values = score(gen, samples.labels, reference, metrics, class_logits=logits, **kw)
        per_range, n_per_range = {}, None
        if seed_ranges > 1:
            columns, per_range, n_per_range = _seed_ranges(
                gen, samples.labels, reference, metrics, seed_ranges, **kw
            )
            values |= columns
        pcf = None
        if per_class_w is not None and abs(w - per_class_w) < 1e-9:
            pcf = {samples.classes[c]: v for c, v in per_class_fid(gen, samples.labels, reference).items()}
        fp = fingerprint(gen, reference)
        record = CellRecord(
            p_uncond=samples.p_uncond,
            w=w,
            guidance=samples.guidance[j],
            guidance_options=samples.guidance_options[j],
            guidance_label=samples.guidance_label[j],
            sampler=samples.sampler,
            sampler_options=samples.sampler_options,
            steps=samples.steps,
            seed=samples.seed,
            n_samples=len(gen),
            extractor=extractor_name,
            metrics=values,
            fingerprint=fp.key(),
            fingerprint_detail=fp.to_dict(),
            checkpoint=samples.checkpoint,
            weights_hash=samples.weights_hash,
            train_run_id=samples.train_run_id,
            n_per_range=n_per_range,
            ranges=per_range,
            per_class_fid=pcf,
            chance_acc=chance,
            noise_fid=noise_fid,
        )
        if on_cell is not None and d.world == 1:
            on_cell(record, images)  # one process: as soon as it is scored
        mine.append((j, record))
    if d.world == 1:
        return [record for _, record in mine]
    parts: list[list[tuple[int, CellRecord]] | None] = [None] * d.world
    torch.distributed.all_gather_object(parts, mine)
    records = [record for _, record in sorted((x for part in parts for x in part), key=lambda x: x[0])]
    if on_cell is not None:
        for j, record in enumerate(records):
            on_cell(record, samples.images[j])
    return records


def metrics_from_params(evaluate) -> dict[str, dict]:
    """params.yaml's `evaluate.metrics` with their `metric_options`, completed with the defaults."""
    return {
        name: METRICS.resolve(name, evaluate.metric_options.get(name), f"evaluate.metric_options.{name}")
        for name in evaluate.metrics
    }
