"""Stage `classifier`: train the evaluation network (the default FID / IS feature extractor)."""

import argparse

from cfg.data.datasets import load_prepared
from cfg.engine.device import resolve_device
from cfg.io import write_json
from cfg.log import get_logger, setup
from cfg.nets.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier
from cfg.progress import Progress
from cfg.study.stage import stage_params
from cfg.study.store import flatten
from cfg.study.tracking import Tracker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="prepared data file")
    ap.add_argument("--out", required=True, help="classifier checkpoint")
    ap.add_argument("--metrics", required=True, help="JSON with the test accuracy")
    args = ap.parse_args()
    setup()
    params = stage_params()
    p = params.classifier
    device = resolve_device(params.train.device)
    tracker = Tracker.open("classifier", params.tracking.experiment)  # the store answers, or exit now

    ds = load_prepared(args.data)
    config = ClassifierConfig(
        in_channels=ds.channels,
        num_classes=ds.num_classes,
        image_size=ds.image_size,
        width=p.width,
        feature_dim=p.feature_dim,
    )
    progress = Progress("classifier", p.epochs, "epochs", every_s=0)
    model, history = train_classifier(
        ds.train_x,
        ds.train_y,
        config,
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
        seed=p.seed,
        device=device,
        progress=lambda h: progress.update(h["epoch"], f"loss {h['loss']:.4g}, acc {h['train_acc']:.4g}"),
    )
    test_acc = accuracy(model, ds.test_x, ds.test_y, device=device)
    meta = {
        "data_fingerprint": ds.fingerprint(),
        "test_accuracy": test_acc,
        "params": params.to_dict()["classifier"],
    }
    save_classifier(args.out, model, meta)
    write_json(args.metrics, {"test_accuracy": test_acc, "n_test": len(ds.test_y)})
    get_logger("classifier").info(f"test accuracy {test_acc:.4f} on {len(ds.test_y)} images")

    run_id = tracker.start_run(
        "classifier", params.section_hash("data", "classifier"), {"run_kind": "classifier"}
    )
    tracker.log(
        run_id,
        params=flatten(params.to_dict()["classifier"], "classifier."),
        metrics={"test_accuracy": test_acc},
    )
    for h in history:
        tracker.log(run_id, metrics={"train_loss": h["loss"], "train_acc": h["train_acc"]}, step=h["epoch"])
    tracker.log_artifact(run_id, args.out)
    tracker.finish()


if __name__ == "__main__":
    main()
