"""Compile the study's networks ahead of its stages, so that they find torch.compile's caches warm.

On a machine whose Inductor cache is empty (a fresh machine, a new torch, a changed model) each train arm spends
≈ 2 min compiling its training step before its first step, its first FID-curve point ≈ 30 s more compiling the
sampling network, and each sampling process ≈ 50 s (the preset on 4 H200s: ≈ 180 s of a 703 s study; README
"Several GPUs"). Those compilations are the same in every arm: the graphs depend on the network's configuration,
the batch shapes and the compile settings, never on the data, the weights or p_uncond. `cfg-lab repro --parallel`
therefore runs this module on a GPU while the upstream stages (classifier, reference) run, and the arms then load
the compiled graphs from Inductor's caches (FX graph and AOTAutograd caches, on disk, shared by the host's
processes) instead of compiling them again.

The calls here go through the very functions the stages call, with stand-in data of the stages' shapes, so the
graphs are the stages' graphs: `train_diffusion` for a few steps (the train stage's step, the CUDA graph capture
included), `generate_w_grid` for one batch of a few sampling steps with the FID curve's w and sample count (the
train stage's curve) and with the sample stage's w grid and batch for each guidance method (the sample stage).
What is warmed, and what is not (a guide network, DDP training), is in `warm_parts`.

    python -m cfg.engine.warmup train --info data/prepared.json     # or: sample
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cfg.engine.generate import examples_per_batch, generate_w_grid, guidance_of, sampling_kwargs
from cfg.engine.training import GRAPH_WARMUP, train_diffusion, train_kwargs
from cfg.maths.guidance import needs_guide_network
from cfg.nets.unet import EMA, UNet, UNetConfig

PARTS = ("train", "sample")
SAMPLING_STEPS = 2  # the network's graph does not depend on the number of steps: the fewest that run


def warm_parts(params, kind: str) -> list[str]:
    """The parts worth compiling ahead: `train` when the train stage compiles its step in one process, as
    `cfg-lab repro --parallel` runs it with `train.devices` 1 or `all` (a slot's GPU; DDP's step over N GPUs is
    another graph), `sample` when sampling compiles (the train stage's FID curve and the sample stage); none on
    CPU, where nothing is compiled."""
    if kind != "cuda":
        return []
    t, s = params.train, params.sample
    parts = []
    if t.compile and (t.devices == "all" or int(t.devices) == 1):
        parts.append("train")
    if s.compile:
        parts.append("sample")
    return parts


def unet_config(params, info: dict) -> UNetConfig:
    """The p_uncond arms' U-Net, from params.yaml and the prepare stage's summary (data/prepared.json)."""
    return UNetConfig.from_params(
        params.model,
        image_size=int(info["image_size"]),
        in_channels=int(info["channels"]),
        num_classes=len(info["classes"]),
    )


def warm_train(params, config: UNetConfig, device: torch.device) -> None:
    """The train stage's step (`train_diffusion` with its settings), for GRAPH_WARMUP + 1 steps: eager warm-up,
    then the CUDA graph's capture when `train.cuda_graph` is on, on zeros of the stage's batch shape."""
    t = params.train
    shape = (t.batch_size, config.in_channels, config.image_size, config.image_size)
    train_diffusion(
        config,
        torch.zeros(shape),
        torch.zeros(t.batch_size, dtype=torch.int64),
        p_uncond=float(t.p_uncond[0]),
        device=device,
        **train_kwargs(t) | {"steps": GRAPH_WARMUP + 1},
        log_every=GRAPH_WARMUP + 1,
    )


def warm_sample(params, config: UNetConfig, device: torch.device) -> None:
    """The sampling network as the train stage's FID curve runs it (the EMA copy: eval mode, no gradients; w = 0
    and train.eval_w; eval_samples) and as the sample stage runs it (a loaded checkpoint: eval mode; the w grid,
    one batch of sample.batch_size rows, each guidance method without a guide network)."""
    t, s = params.train, params.sample
    shape = (config.in_channels, config.image_size, config.image_size)
    common = {"num_classes": config.num_classes, "image_shape": shape, "device": device}
    kwargs = sampling_kwargs(params) | {"steps": SAMPLING_STEPS}
    if t.eval_every:  # pipelines/train.py: training_curve(...) -> score_model(ema, [0, eval_w], eval_samples)
        model = UNet(config).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        generate_w_grid(EMA(model).model, [0.0, t.eval_w], t.eval_samples, **common, **kwargs)
    model = UNet(config).eval()  # as load_checkpoint returns it
    per_batch = examples_per_batch(s.batch_size, len(s.w))
    # a full batch, and the cell's last one when it is shorter (the shards are whole batches but for that one)
    sizes = sorted({min(per_batch, s.n_samples), s.n_samples % per_batch} - {0}, reverse=True)
    for name, options in guidance_of(s):
        if needs_guide_network([(name, options)]):
            continue  # the guide is another network, trained by its own stage
        for n in sizes:
            generate_w_grid(
                model.to(device), s.w, n, **common, **kwargs | {"guidance": name, "guidance_options": options}
            )


def main(argv: list[str] | None = None) -> int:
    from cfg.engine.device import resolve_device
    from cfg.study.stage import stage_params

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS, help="which stage's networks to compile")
    ap.add_argument("--info", default="data/prepared.json", help="the prepare stage's summary")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = stage_params(args.params)
    device = resolve_device(params.train.device)
    if args.part not in warm_parts(params, device.type):
        print(f"[warmup] {args.part}: nothing is compiled ahead here", file=sys.stderr)
        return 0
    config = unet_config(params, json.loads(Path(args.info).read_text()))
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        (warm_train if args.part == "train" else warm_sample)(params, config, device)
    print(f"[warmup] {args.part}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
