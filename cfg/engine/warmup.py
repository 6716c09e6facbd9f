"""Compile the study's networks ahead of its stages, so that they find torch.compile's caches warm.

On a machine whose Inductor cache is empty (a fresh machine, a new torch, a changed model) each train arm spends
≈ 2 min compiling its training step before its first step, its first FID-curve point ≈ 30 s more compiling the
sampling network, and each sampling process ≈ 50-70 s (the preset on 4 H200s: ≈ 180 s of a 703 s study without
this module; with it, the same study took 594 s from empty caches and 518 s with warm ones; README "Several
GPUs"). Those compilations are the same in every arm: the graphs depend on the network's configuration,
the batch shapes and the compile settings, never on the data, the weights or p_uncond. `cfg-lab repro --parallel`
therefore runs this module on a GPU while the upstream stages (classifier, reference) run, and the arms then load
the compiled graphs from Inductor's caches (FX graph and AOTAutograd caches, on disk, shared by the host's
processes) instead of compiling them again.

The calls here go through the very functions the stages call, with stand-in data of the stages' shapes, and in
the order a stage's process makes them, so the graphs are the stages' graphs: torch.compile marks a batch
dimension dynamic once a process has seen it change (Dynamo's automatic dynamic shapes), so a graph depends on
what the process compiled before it, and Inductor's cache keys name the device index. Hence two parts, each in
fresh processes like the stages':
    train    `train_diffusion` for a few steps (the train stage's step, the CUDA graph's capture included), then, as
             its callback, the FID curve's sampling of the EMA weights (w = 0 and train.eval_w, eval_samples).
             Between the two it prints STEP_READY: the train arms start then, and the FID curve's graphs are
             compiled while their first eval_every steps run (on 4 H100s a train arm reached its first curve
             point ≈ 60 s after it started; on H200s a cold first point took ≈ 30 s longer than a warm one)
    sample   for each guidance method in order, a full batch of the cell (the blocks a rank claims) and then the
             cell's shorter last batch if it is that rank's, with the stage's w grid, sampler and steps; one
             process per rank (`--rank R --world N`), on cuda:R as rank R samples
What is warmed, and what is not (a guide network, DDP training), is in `warm_parts`.

    python -m cfg.engine.warmup train --info data/prepared.json     # or: sample --rank 1 --world 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cfg.engine.distributed import Dist, owns_short_block
from cfg.engine.generate import examples_per_batch, generate_w_grid, guidance_of, sampling_kwargs
from cfg.engine.training import GRAPH_WARMUP, train_diffusion, train_kwargs
from cfg.maths.guidance import needs_guide_network
from cfg.nets.unet import UNet, UNetConfig

PARTS = ("train", "sample")

# what the train part prints once the training step is compiled (and, with train.cuda_graph, captured): what a
# train arm's first steps need; `cfg-lab repro --parallel` starts the train arms when it reads it
STEP_READY = "[warmup] train: step compiled"

# the sampling ranks' compilations run at this lower CPU priority (os.nice, inherited by Inductor's compile workers):
# the train arms wait for the train part's step, while a sample arm starts only once a model is trained, minutes
# later, so on a host whose cores the parts share (4 sampling ranks, the train part and the classifier stage on
# 4 GPUs) the train part should get the cores first
SAMPLE_NICE = 10


def compile_summary(top: int = 20) -> str:
    """The `top` longest of Dynamo's compile-time counters so far (seconds, summed over this process's compiles,
    nested: a counter includes those called inside it), one `name seconds` pair per line: where a cold compile's
    minutes go (tracing, AOTAutograd, Inductor's lowering and code generation, waiting for Triton's compile
    workers). A private torch API: where it fails, the reason instead."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        rows = sorted(zip(names, (float(v) for v in values), strict=True), key=lambda r: -r[1])[:top]
    except Exception as e:  # noqa: BLE001 (a report only: it runs in the step's callback, the warm-up goes on)
        return f"  (torch._dynamo.utils.compile_times failed: {e!r})"
    return "\n".join(f"  {name:<60s} {seconds:8.1f}" for name, seconds in rows)


def warm_parts(params, kind: str) -> list[str]:
    """The parts worth compiling ahead: `train` when the train stage compiles (its step, or its FID curve's
    sampling) in one process, as `cfg-lab repro --parallel` runs it with `train.devices` 1 or `all` (a slot's
    GPU; DDP's step over N GPUs is another graph), `sample` when the sample stage compiles; none on CPU, where
    nothing is compiled."""
    if kind != "cuda":
        return []
    t, s = params.train, params.sample
    parts = []
    compiles = t.compile or (s.compile and t.eval_every)
    if compiles and (t.devices == "all" or int(t.devices) == 1):
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


def _shape(config: UNetConfig) -> tuple[int, int, int]:
    return (config.in_channels, config.image_size, config.image_size)


def warm_train(
    params, config: UNetConfig, device: torch.device, ready: Callable[[], None] | None = None
) -> None:
    """The train stage's process: its step (`train_diffusion` with its settings) for GRAPH_WARMUP + 1 steps (eager
    warm-up, then the CUDA graph's capture when `train.cuda_graph` is on) on zeros of its batch shape, then, from
    the step's callback as pipelines/train.py scores its curve, the sampling of the EMA weights at w = 0 and
    train.eval_w (`score_model`'s `generate_w_grid` call, eval_samples per w). `ready` is called between the
    two, once the step is compiled."""
    t = params.train
    steps = GRAPH_WARMUP + 1

    def fid_curve(entry: dict) -> None:
        if entry["step"] != steps:
            return
        if ready is not None:
            ready()
        if t.eval_every:
            generate_w_grid(
                entry["ema"],
                [0.0, t.eval_w],
                t.eval_samples,
                num_classes=config.num_classes,
                image_shape=_shape(config),
                device=device,
                **sampling_kwargs(params),
            )

    train_diffusion(
        config,
        torch.zeros((t.batch_size, *_shape(config))),
        torch.zeros(t.batch_size, dtype=torch.int64),
        p_uncond=float(t.p_uncond[0]),
        device=device,
        **train_kwargs(t) | {"steps": steps},
        log_every=steps,
        callback=fid_curve,
    )


def rank_batches(n_samples: int, block: int, d: Dist) -> torch.Tensor:
    """Examples that meet every batch shape rank d meets as it samples a cell (`Claims`: whole blocks of `block`,
    each to the rank that asks first; the shorter last block to its `shard` rank after its full ones), in its
    order: a full block when the cell has one (any rank may claim one), then the short block when it is this
    rank's. A rank that claims no full block (more ranks than blocks, or others faster) compiles its short one
    for itself."""
    full = n_samples // block
    first = torch.arange(block) if full else torch.arange(0)
    if owns_short_block(n_samples, block, d):
        return torch.cat([first, torch.arange(full * block, n_samples)])
    return first


def warm_sample(params, config: UNetConfig, device: torch.device, d: Dist | None = None) -> None:
    """Rank d's sample stage process (a loaded checkpoint: eval mode): for each guidance method in order (but one
    that needs a guide network: another network), the batches of `rank_batches`, with the stage's sampler and
    steps."""
    s = params.sample
    model = UNet(config).eval().to(device)
    examples = rank_batches(s.n_samples, examples_per_batch(s.batch_size, len(s.w)), d or Dist())
    if not len(examples):
        return  # a rank without examples samples nothing
    for name, options in guidance_of(s):
        if needs_guide_network([(name, options)]):
            continue
        generate_w_grid(
            model,
            s.w,
            len(examples),
            examples=examples,
            num_classes=config.num_classes,
            image_shape=_shape(config),
            device=device,
            **sampling_kwargs(params) | {"guidance": name, "guidance_options": options},
        )


def main(argv: list[str] | None = None) -> int:
    from cfg.engine.device import resolve_device
    from cfg.study.stage import stage_params

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS, help="which stage's networks to compile")
    ap.add_argument("--info", default="data/prepared.json", help="the prepare stage's summary")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rank", type=int, default=0, help="sample: the sampling rank to warm (on cuda:RANK)")
    ap.add_argument("--world", type=int, default=1, help="sample: the sampling ranks of a sample arm")
    args = ap.parse_args(argv)
    params = stage_params(args.params)
    device = resolve_device(params.train.device)
    if device.type == "cuda" and args.part == "sample":
        device = torch.device("cuda", args.rank)
        torch.cuda.set_device(device)
    if args.part not in warm_parts(params, device.type):
        print(f"[warmup] {args.part}: nothing is compiled ahead here", file=sys.stderr)
        return 0
    config = unet_config(params, json.loads(Path(args.info).read_text()))
    t0 = time.perf_counter()

    def ready() -> None:
        print(f"{STEP_READY} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        print(f"[warmup] train: where the step's compilation went (s)\n{compile_summary()}", file=sys.stderr)

    if args.part == "sample" and device.type == "cuda":
        os.nice(SAMPLE_NICE)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if args.part == "train":
            warm_train(params, config, device, ready)
        else:
            warm_sample(params, config, device, Dist(args.rank, args.world, args.rank))
    print(f"[warmup] {args.part}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.part == "train":
        print(f"[warmup] train: all its compilations (s)\n{compile_summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
