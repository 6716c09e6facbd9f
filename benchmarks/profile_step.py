"""Where a training step's and a guided sampling step's time goes, and which settings make them faster.

    python benchmarks/profile_step.py [--preset presets/fashion_mnist_gpu.yaml] [--seconds 4]

For each variant (memory format, torch.compile mode, batch) prints images/s and MFU (model FLOPs per image
from torch's FLOP counter x images/s / the matmul rate measured in the same run), then a torch.profiler
table of the top CUDA kernels of the eager and the best compiled training step with their share of the
step's device time. Graph breaks of the compiled variants are counted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from bench_throughput import flops_per_image, matmul_rate, sync
from torch.profiler import ProfilerActivity, profile

from cfg.engine.device import autocast, configure_cuda
from cfg.engine.training import train_diffusion
from cfg.maths.diffusion import diffusion_loss
from cfg.maths.guidance import guided_eps
from cfg.nets.unet import UNet, UNetConfig
from cfg.study.config import params_from_dict
from cfg.study.presets import flat_overrides, merged_params


def timed(fn, seconds: float) -> float:
    """Median seconds per call after warm-up, with CUDA events."""
    for _ in range(3):
        fn()
    sync(torch.device("cuda"))
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def build(config: UNetConfig, fmt, mode: str | None):
    torch.manual_seed(0)
    model = UNet(config).cuda().to(memory_format=fmt)
    for p in model.parameters():  # away from the zero init, so nothing is trivially skipped
        p.data.add_(0.01 * torch.randn_like(p))
    net = model if mode is None else torch.compile(model, mode=None if mode == "default" else mode)
    return model, net


def train_fn(config, fmt, mode, batch):
    model, net = build(config, fmt, mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    c, s = config.in_channels, config.image_size
    x = torch.randn(batch, c, s, s, device="cuda").contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        with autocast(torch.device("cuda"), True):
            loss = diffusion_loss(net, x, y, p_uncond=0.1, null_label=10, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sample_fn(config, fmt, mode, batch):
    model, net = build(config, fmt, mode)
    model.eval()
    c, s = config.in_channels, config.image_size
    z = torch.randn(batch, c, s, s, device="cuda").contiguous(memory_format=fmt)
    lab = torch.randint(0, 10, (batch,), device="cuda")
    w = torch.linspace(0.1, 4, batch, device="cuda")  # every row both passes
    lam = torch.zeros(batch, device="cuda")

    def step():
        with torch.no_grad(), autocast(torch.device("cuda"), True):
            return guided_eps(net, z, lam, lab, w, 10)

    return step


def loop_rate(config, batch: int, steps: int, *, compile: bool, cuda_graph: bool) -> tuple[float, float]:
    """images/s of the real training loop (cfg.engine.training.train_diffusion: batch gather, draws, loss,
    backward, clipping, Adam, EMA, loss bookkeeping), timed by the loop itself after its first logged interval
    (compilation, autotuning and graph capture excluded); and the wall seconds of the whole call."""
    n = 20_000
    x = torch.rand(n, config.in_channels, config.image_size, config.image_size) * 2 - 1
    y = torch.randint(0, config.num_classes, (n,))
    t0 = time.perf_counter()
    result = train_diffusion(
        config, x, y, steps=steps, batch_size=batch, warmup_steps=10, device="cuda", bf16=True,
        compile=compile, cuda_graph=cuda_graph, log_every=max(10, steps // 5),
    )  # fmt: skip
    return result.images_per_s, time.perf_counter() - t0


def top_kernels(step, n: int = 12) -> list[str]:
    for _ in range(3):
        step()
    sync(torch.device("cuda"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        sync(torch.device("cuda"))
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    return [
        f"  {e.self_device_time_total / total:6.1%}  {e.count // 5:>4}/step  {e.key[:100]}"
        for e in events[:n]
    ]


def print_table(rows, peak: float, f_train: float, f_fwd: float) -> None:
    print(
        f"\ndevice {torch.cuda.get_device_name(0)}, torch {torch.__version__}; matmul {peak / 1e12:.0f} TFLOP/s"
    )
    print(f"model FLOPs per image: train {f_train / 1e9:.2f} G, forward {f_fwd / 1e9:.2f} G")
    print(f"{'what':<44}{'batch':>6}{'images/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'breaks':>7}{'wall s':>7}")
    for what, b, ips, flops, breaks, wall in rows:
        print(f"{what:<44}{b:>6}{ips:>11,.0f}{flops / 1e12:>9.1f}{flops / peak:>7.1%}{breaks:>7}{wall:>7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="presets/fashion_mnist_gpu.yaml")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument(
        "--loop-only",
        action="store_true",
        help="only the real training loop: compiled vs compiled + CUDA graph (train.cuda_graph), batch 256 and 512",
    )
    ap.add_argument("--loop-steps", type=int, default=400, help="steps of each training-loop run")
    args = ap.parse_args()
    raw = merged_params(
        yaml.safe_load(Path("params.yaml").read_text()),
        flat_overrides(yaml.safe_load(Path(args.preset).read_text())),
    )
    params = params_from_dict(raw)
    configure_cuda()
    size = params.data.image_size or 32
    config = UNetConfig.from_params(params.model, image_size=size, in_channels=1, num_classes=10)
    peak = matmul_rate(torch.device("cuda"), args.seconds)
    probe = UNet(config).cuda()
    f_train = flops_per_image(probe, config, torch.device("cuda"), train=True)
    f_fwd = flops_per_image(probe, config, torch.device("cuda"), train=False)
    cl, cf = torch.channels_last, torch.contiguous_format
    rows = []
    loop = [(b, c, g) for b in (256, 512) for c, g in ((True, False), (True, True))]
    for batch, compiled, graphed in loop:
        torch._dynamo.reset()
        ips, wall = loop_rate(config, batch, args.loop_steps, compile=compiled, cuda_graph=graphed)
        what = "train loop compile" + (" + CUDA graph" if graphed else "")
        rows.append((what, batch, ips, f_train * ips, 0, wall))
        print(rows[-1], flush=True)
    if args.loop_only:
        print_table(rows, peak, f_train, f_fwd)
        return
    train_variants = [
        ("eager channels_last", cl, None, 256),
        ("eager contiguous", cf, None, 256),
        ("compile channels_last", cl, "default", 256),
        ("compile contiguous", cf, "default", 256),
        ("compile contiguous", cf, "default", 512),
        ("compile contiguous", cf, "default", 1024),
    ]
    steps = {}
    for name, fmt, mode, batch in train_variants:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        t0 = time.perf_counter()
        step = train_fn(config, fmt, mode, batch)
        s = timed(step, args.seconds)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        rows.append(
            (f"train {name}", batch, batch / s, f_train * batch / s, breaks, time.perf_counter() - t0)
        )
        steps[(name, batch)] = step
        print(rows[-1], flush=True)
    sample_variants = [
        ("eager channels_last", cl, None, 4096),
        ("compile channels_last", cl, "default", 4096),
        ("compile contiguous", cf, "default", 4096),
        ("compile reduce-overhead contig.", cf, "reduce-overhead", 4096),
        ("compile contiguous", cf, "default", 8192),
    ]
    for name, fmt, mode, batch in sample_variants:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        t0 = time.perf_counter()
        step = sample_fn(config, fmt, mode, batch)
        s = timed(step, args.seconds)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        rows.append(
            (f"sample step {name}", batch, batch / s, 2 * f_fwd * batch / s, breaks, time.perf_counter() - t0)
        )
        print(rows[-1], flush=True)

    print_table(rows, peak, f_train, f_fwd)
    for key in [("eager channels_last", 256), ("compile contiguous", 256)]:
        print(f"\ntop CUDA kernels, train {key[0]} batch {key[1]} (share of device time):")
        print("\n".join(top_kernels(steps[key])))


if __name__ == "__main__":
    main()
