"""Stage `evaluate`: metrics of every (p_uncond, w) cell, one MLflow run per cell nested under its model."""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from cfg.data.datasets import from_uint8, to_uint8
from cfg.data.images import class_by_w_tiles, save_grid
from cfg.engine.device import resolve_device
from cfg.eval.metrics import (
    CELL_METRICS,
    classifier_extractor,
    evaluate_cell,
    extract_features,
    fid,
    fingerprint,
    inception_score,
    load_reference_stats,
    per_class_fid,
)
from cfg.nets.classifier import load_classifier
from cfg.study.stage import make_extractor, stage_params, write_json
from cfg.study.tracking import client_for, log_flat, provenance_tags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", required=True, help="folder holding p_uncond=<p>/samples.pt")
    ap.add_argument("--classifier", required=True, help="evaluation classifier (class accuracy)")
    ap.add_argument("--reference", required=True, help="reference statistics of the test set")
    ap.add_argument("--out-dir", required=True, help="folder for p_uncond=<p>.json cell records")
    args = ap.parse_args()
    params = stage_params()
    e = params.evaluate
    device = resolve_device(params.train.device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ref = load_reference_stats(args.reference)
    extractor = make_extractor(e.extractor, args.classifier, e.inception_weights, device)
    # class accuracy always uses the evaluation classifier, whichever network gives the features
    classifier = classifier_extractor(load_classifier(args.classifier, map_location=device)[0])
    client, exp_id = client_for(params.tracking.uri, params.tracking.experiment)
    params_hash = params.section_hash("sample", "evaluate")

    for p in params.train.p_uncond:
        blob = torch.load(Path(args.samples) / f"p_uncond={p}" / "samples.pt", weights_only=True)
        labels = blob["labels"]
        n_classes = len(blob["classes"])
        records = []
        for j, w in enumerate(blob["w"]):
            images = from_uint8(blob["images"][j])
            gen = extract_features(extractor, images, batch_size=e.batch_size, device=device)
            cls = (
                gen
                if extractor.name == "classifier"
                else extract_features(classifier, images, batch_size=e.batch_size, device=device)
            )
            m = evaluate_cell(
                gen,
                labels,
                ref,
                class_logits=cls.logits,
                kid_subsets=e.kid_subsets,
                kid_subset_size=e.kid_subset_size,
                k=e.pr_k,
                seed=blob["seed"],
                device=device,
            )
            # FID and IS of disjoint example ranges: independent noise, n / R samples each
            if e.seed_ranges > 1:
                index = torch.arange(len(labels))
                parts = [gen.select(torch.isin(index, r)) for r in index.chunk(e.seed_ranges)]
                fids = [fid(part, ref) for part in parts]
                iss = [inception_score(part)[0] for part in parts]
                m |= {
                    "fid_ranges": fids,
                    "fid_range_mean": statistics.mean(fids),
                    "fid_range_std": statistics.stdev(fids),
                    "is_ranges": iss,
                    "is_range_mean": statistics.mean(iss),
                    "is_range_std": statistics.stdev(iss),
                    "n_per_range": len(parts[0]),
                }
            if e.per_class_w is not None and abs(w - e.per_class_w) < 1e-9:
                m["per_class_fid"] = {
                    blob["classes"][c]: v for c, v in per_class_fid(gen, labels, ref).items()
                }
            record = {
                "p_uncond": p,
                "w": w,
                "sampler": blob["sampler"],
                "steps": blob["steps"],
                "v": blob["v"] if blob["sampler"] == "ancestral" else None,
                "seed": blob["seed"],
                "checkpoint": blob["checkpoint"],
                "train_run_id": blob["checkpoint_run_id"],
                "extractor": extractor.name,
                **m,
                "fingerprint_detail": fingerprint(gen, ref).to_dict(),
            }
            record["mlflow_run_id"] = _log_cell(
                client, exp_id, record, images, labels, n_classes, params_hash
            )
            records.append(record)
            print(
                f"[evaluate] p_uncond={p} w={w:g}: FID {m['fid']:.3f}  IS {m['is']:.3f}  "
                f"KID {m['kid']:.4f}  P {m['precision']:.3f}  R {m['recall']:.3f}  acc {m['class_acc']:.3f}"
            )
        write_json(out / f"p_uncond={p}.json", records)


def _log_cell(
    client,
    exp_id: str,
    rec: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    params_hash: str,
) -> str:
    """A cell run nested under its model's train run: p_uncond and w as params, metrics, its sample grid."""
    tags = provenance_tags(
        "evaluate",
        params_hash,
        {"run_kind": "cell", "mlflow.parentRunId": rec["train_run_id"], "fingerprint": rec["fingerprint"]}
        | {f"fingerprint.{k}": v for k, v in rec["fingerprint_detail"].items()},
    )
    run = client.create_run(exp_id, run_name=f"cell p_uncond={rec['p_uncond']} w={rec['w']:g}", tags=tags)
    rid = run.info.run_id
    log_flat(
        client,
        rid,
        params={
            k: rec[k] for k in ("p_uncond", "w", "sampler", "steps", "v", "seed", "extractor", "n_samples")
        },
        metrics={k: rec[k] for k in CELL_METRICS if rec.get(k) is not None},
    )
    if "per_class_fid" in rec:
        log_flat(client, rid, metrics={f"fid_class_{c}": v for c, v in rec["per_class_fid"].items()})
    with tempfile.TemporaryDirectory() as tmp:
        per = max(1, min(8, len(labels) // n_classes))  # up to 8 samples of each class
        u8 = to_uint8(images[: n_classes * per])
        tiles = class_by_w_tiles(u8[None], labels[: n_classes * per], n_classes, per_class=per)[:, 0]
        save_grid(
            Path(tmp) / "samples.png",
            tiles.view(n_classes, per, *tiles.shape[1:]),
            upscale=max(1, 64 // images.shape[-1]),
        )
        client.log_artifact(rid, str(Path(tmp) / "samples.png"))
    client.set_terminated(rid)
    return rid


if __name__ == "__main__":
    main()
