"""Stage `prepare`: load the data set named in params.yaml and store both splits compactly (uint8)."""

import argparse

from cfg.data.datasets import load_dataset, save_prepared
from cfg.io import write_json
from cfg.study.stage import data_root, stage_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="prepared data file (both splits)")
    ap.add_argument("--info", required=True, help="JSON summary: sizes, classes, fingerprint")
    args = ap.parse_args()
    p = stage_params().data

    ds = load_dataset(
        p.name,
        root=data_root(p.root),
        image_size=p.image_size,
        download=p.download,
        max_train=p.max_train,
        max_test=p.max_test,
    )
    save_prepared(ds, args.out)
    info = {
        "name": ds.name,
        "train": len(ds.train_y),
        "test": len(ds.test_y),
        "classes": ds.classes,
        "channels": ds.channels,
        "image_size": ds.image_size,
        "fingerprint": ds.fingerprint(),
    }
    write_json(args.info, info)
    print(
        f"[prepare] {ds.name}: {info['train']} train / {info['test']} test images, "
        f"{ds.channels}x{ds.image_size}x{ds.image_size}, fingerprint {info['fingerprint'][:12]}"
    )


if __name__ == "__main__":
    main()
