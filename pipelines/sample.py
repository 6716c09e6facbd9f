"""Stage `sample@<p_uncond>`: sample every w of the grid from one model, the same noise for every w."""

import argparse
import time
from pathlib import Path

import torch

from cfg.data.images import class_by_w_tiles, save_grid
from cfg.engine.device import resolve_device
from cfg.engine.generate import generate_w_grid, sampling_kwargs
from cfg.nets.unet import load_checkpoint
from cfg.study.stage import progress_printer, stage_params, write_json
from cfg.study.tracking import client_for, log_flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="trained model")
    ap.add_argument("--out-dir", required=True, help="folder for samples.pt, grid.png, sample.json")
    args = ap.parse_args()
    params = stage_params()
    s = params.sample
    device = resolve_device(params.train.device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    cfg = model.config
    show = progress_printer(f"sample p_uncond={meta['p_uncond']} on {device.type}", "images")
    t0 = time.perf_counter()
    images, labels = generate_w_grid(
        model.to(device),
        s.w,
        s.n_samples,
        num_classes=cfg.num_classes,
        image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        device=device,
        **sampling_kwargs(params),
        progress=lambda i: show(
            {
                "done": i["images"],
                "total": i["total_images"],
                "eta_s": i["eta_s"],
                "rate": i["images"] / max(i["elapsed_s"], 1e-9),
            }
        ),
    )
    seconds = time.perf_counter() - t0
    info = {
        "p_uncond": meta["p_uncond"],
        "w": s.w,
        "sampler": s.sampler,
        "steps": s.steps,
        "v": s.v,
        "clip_denoised": s.clip_denoised,
        "n_samples": s.n_samples,
        "seed": s.seed,
        "checkpoint": str(args.checkpoint),
        "checkpoint_run_id": meta["mlflow_run_id"],
        "checkpoint_params_hash": meta["params_hash"],
        "device": str(device),
        "seconds": seconds,
        "images_per_s": images.shape[0] * images.shape[1] / seconds,
        "classes": meta["classes"],
    }
    torch.save({"images": images, "labels": labels, **info}, out / "samples.pt")
    save_grid(
        out / "grid.png",
        class_by_w_tiles(images, labels, cfg.num_classes, s.grid_per_class),
        upscale=max(1, 64 // cfg.image_size),
    )
    write_json(out / "sample.json", {k: v for k, v in info.items() if k != "classes"})

    client, _ = client_for(params.tracking.uri, params.tracking.experiment)
    log_flat(client, meta["mlflow_run_id"], metrics={"sample_images_per_s": info["images_per_s"]})
    client.log_artifact(meta["mlflow_run_id"], str(out / "grid.png"), "samples")
    print(
        f"[sample p_uncond={meta['p_uncond']}] {images.shape[0]} w x {images.shape[1]} images in "
        f"{seconds:.1f}s ({info['images_per_s']:.0f} images/s)"
    )


if __name__ == "__main__":
    main()
