"""How far apart IS must be in w to rise beyond its sampling noise: IS per (p_uncond, sampling seed) on a w grid.

Samples each trained model of a project (models/p_uncond=<p>/checkpoint.pt) with several sampling seeds,
scores IS with the evaluation classifier and prints one row per (p_uncond, seed) and, per adjacent w pair,
in how many runs IS fell. The embedded default's w grid was chosen with it (README, "Choosing the w grid").

    python benchmarks/is_grid_noise.py [--w -1 0 0.1 0.2 0.3 0.5 1 2 4] [--seeds 1 2 3 4] [--n 400]
"""

import argparse
import time
from pathlib import Path

from cfg.data.images import from_uint8
from cfg.engine.generate import generate_w_grid, sampling_kwargs
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.metrics import inception_score
from cfg.nets.classifier import load_classifier
from cfg.nets.unet import load_checkpoint
from cfg.study.config import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".", help="DVC project whose models/ and params.yaml are used")
    ap.add_argument("--w", type=float, nargs="+", default=[-1, 0, 0.1, 0.2, 0.3, 0.5, 1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=None, help="samples per cell (default: sample.n_samples)")
    args = ap.parse_args()
    root = Path(args.project)
    params = load_params(root / "params.yaml")
    s = params.sample
    n = args.n or s.n_samples
    clf = classifier_extractor(load_classifier(root / "models" / "classifier.pt", map_location="cpu")[0])
    rows = []
    print("| p_uncond | seed | seconds | " + " | ".join(f"IS w={w:g}" for w in args.w) + " |")
    print("|---" * (3 + len(args.w)) + "|")
    for seed in args.seeds:
        for p in params.train.p_uncond:
            model, _ = load_checkpoint(
                root / "models" / f"p_uncond={p}" / "checkpoint.pt", map_location="cpu"
            )
            t0 = time.perf_counter()
            images, _ = generate_w_grid(
                model,
                args.w,
                n,
                num_classes=model.config.num_classes,
                image_shape=(model.config.in_channels, model.config.image_size, model.config.image_size),
                **(sampling_kwargs(params) | {"seed": seed}),
            )
            seconds = time.perf_counter() - t0
            scores = [
                inception_score(extract_features(clf, from_uint8(images[j]), batch_size=500))[0]
                for j in range(len(args.w))
            ]
            rows.append(scores)
            print(
                f"| {p:g} | {seed} | {seconds:.0f} | " + " | ".join(f"{v:.4f}" for v in scores) + " |",
                flush=True,
            )
    print("\n| w -> w' | runs where IS fell | smallest rise | largest rise |")
    print("|---|---|---|---|")
    for j in range(len(args.w) - 1):
        d = [r[j + 1] - r[j] for r in rows]
        print(
            f"| {args.w[j]:g} -> {args.w[j + 1]:g} | {sum(x <= 0 for x in d)} of {len(d)} | {min(d):+.4f} | {max(d):+.4f} |"
        )


if __name__ == "__main__":
    main()
