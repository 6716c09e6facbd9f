"""Stage `reference`: features and statistics of the real test set, computed once per extractor."""

import argparse

from cfg.data.datasets import load_prepared
from cfg.engine.device import resolve_device
from cfg.eval.features import extract_features
from cfg.eval.stats import reference_stats, save_reference_stats
from cfg.study.stage import make_extractor, stage_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="prepared data file")
    ap.add_argument("--classifier", required=True, help="evaluation classifier checkpoint")
    ap.add_argument("--out", required=True, help="reference statistics file")
    args = ap.parse_args()
    params = stage_params()
    e = params.evaluate
    device = resolve_device(params.train.device)

    ds = load_prepared(args.data)
    extractor = make_extractor(e.extractor, args.classifier, e.inception_weights, device)
    feats = extract_features(extractor, ds.test_x, batch_size=e.batch_size, device=device)
    stats = reference_stats(feats, extractor, labels=ds.test_y)
    save_reference_stats(args.out, stats)
    print(
        f"[reference] {e.extractor}: {stats.n} test images, {feats.features.shape[1]}-d features, "
        f"hash {stats.hash[:12]}"
    )


if __name__ == "__main__":
    main()
