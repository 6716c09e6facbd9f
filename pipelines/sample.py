"""Stage `sample@<p_uncond>`: sample every w of the grid from one model, the same noise for every w."""

import argparse
from pathlib import Path

from cfg.data.images import class_by_w_tiles, save_grid
from cfg.engine.distributed import finish, init, launch, n_processes
from cfg.engine.generate import guidance_of, load_guide, sample_checkpoint
from cfg.io import write_json
from cfg.log import get_logger, setup
from cfg.maths.guidance import needs_guide_network
from cfg.nets.unet import load_checkpoint
from cfg.progress import Progress
from cfg.study.stage import stage_params
from cfg.study.tracking import Tracker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="trained model")
    ap.add_argument(
        "--guide", help="autoguidance's guide network (train_guide stage), read when a method needs it"
    )
    ap.add_argument("--out-dir", required=True, help="folder for samples.pt, grid.png, sample.json")
    args = ap.parse_args()
    setup()
    params = stage_params()
    launch(
        n_processes(params.sample.devices, params.train.device, "sample.devices")
    )  # under torchrun when sample.devices > 1
    d, device = init(params.train.device)
    out = Path(args.out_dir)

    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    guide = None  # autoguidance's guide network: refused here, before any sampling, unless it fits the model
    if needs_guide_network(guidance_of(params.sample)):
        try:
            guide = load_guide(args.guide, model, meta, map_location=device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if d.main:  # rank 0 logs: the store answers before any sampling, or the stage stops here
        tracker = Tracker.open(f"sample@{meta['p_uncond']}", params.tracking.experiment)
        # the checkpoint's train run, or in a store without it (a clone) a new run with its provenance
        run_id = tracker.checkpoint_run(meta, args.checkpoint, params.section_hash("sample"))
    total = params.sample.n_samples * len(params.sample.w)  # this process's shard: the callback says
    progress = Progress(f"sample p_uncond={meta['p_uncond']} on {device.type}", total, "images")
    samples = sample_checkpoint(
        model,
        meta,
        params,
        checkpoint=args.checkpoint,
        device=device,
        progress=lambda i: progress.update(i["images"], total=i["total_images"]),
        dist=d,
        guide=guide,
        guide_checkpoint=args.guide,
    )
    if not d.main:
        return finish(d)
    samples.save(out / "samples.pt")
    k = len(samples.classes)
    tiles = class_by_w_tiles(samples.images, samples.labels, k, params.sample.grid_per_class)
    save_grid(out / "grid.png", tiles, upscale=max(1, 64 // samples.images.shape[-1]))
    info = samples.info()
    write_json(out / "sample.json", info)

    tracker.log(run_id, metrics={"sample_images_per_s": info["images_per_s"]})
    tracker.log_artifact(run_id, out / "grid.png", "samples")
    tracker.finish()
    get_logger(f"sample p_uncond={samples.p_uncond}").info(
        f"{len(samples.w)} w x {samples.n_samples} images in "
        f"{samples.seconds:.1f}s ({info['images_per_s']:.0f} images/s, {d.world} process(es))"
    )
    finish(d)


if __name__ == "__main__":
    main()
