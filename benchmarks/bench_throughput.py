"""Training and sampling throughput of the U-Net, and the fraction of the device's matmul rate it reaches.

    python benchmarks/bench_throughput.py [--preset presets/fashion_mnist_gpu.yaml] [--seconds 10]

Prints one table: images per second for training steps and for guided sampling steps (the doubled
conditional + unconditional batch counts as one image per example), model TFLOP/s (FLOPs per image from
torch's FLOP counter × images/s) and that rate over the measured dense matmul rate of the device
(bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from cfg.engine.device import autocast, configure_cuda, resolve_device
from cfg.maths.diffusion import diffusion_loss
from cfg.maths.guidance import guided_eps
from cfg.nets.unet import UNet, UNetConfig
from cfg.study.config import params_from_dict
from cfg.study.presets import flat_overrides, merged_params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, seconds: float) -> float:
    """Median seconds per call after warm-up (host clock around synchronised calls)."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, seconds: float) -> float:
    """Measured dense matmul FLOP/s: bf16 8192³ on CUDA, fp32 2048³ on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, seconds)


def flops_per_image(model: torch.nn.Module, config: UNetConfig, device: torch.device, train: bool) -> float:
    x = torch.randn(8, config.in_channels, config.image_size, config.image_size, device=device)
    lam, y = torch.zeros(8, device=device), torch.zeros(8, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(x, lam, y)
        if train:
            out.square().mean().backward()
    return counter.get_total_flops() / 8


def bench_variant(
    name: str,
    config: UNetConfig,
    device: torch.device,
    bf16: bool,
    compile_: bool,
    batch: int,
    nb: int,
    seconds: float,
) -> list[tuple[str, int, float, float]]:
    """(what, batch, images/s, model FLOP/s) of a training step and a guided sampling step."""
    c, size = config.in_channels, config.image_size
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = UNet(config).to(device).to(memory_format=fmt)
    fwd_bwd = flops_per_image(model, config, device, train=True)
    fwd = flops_per_image(model, config, device, train=False)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, c, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def train_step() -> None:
        with autocast(device, bf16):
            loss = diffusion_loss(net, x, y, p_uncond=0.1, null_label=10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = [(f"train {name}", batch, batch / (s := timed(train_step, device, seconds)), fwd_bwd * batch / s)]
    model.eval()
    z = torch.randn(nb, c, size, size, device=device).contiguous(memory_format=fmt)
    lab = torch.randint(0, 10, (nb,), device=device)
    w = torch.linspace(-1, 4, nb, device=device)
    lam = torch.zeros(nb, device=device)

    def sample_step() -> None:
        with torch.no_grad(), autocast(device, bf16):
            guided_eps(net, z, lam, lab, w, 10)

    s = timed(sample_step, device, seconds)
    rows.append((f"sample step {name}", nb, nb / s, 2 * fwd * nb / s))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", help="preset YAML applied over params.yaml (e.g. presets/fashion_mnist_gpu.yaml)"
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="timing budget per row")
    ap.add_argument("--batch", type=int, help="training batch (default: train.batch_size)")
    ap.add_argument("--sample-batch", type=int, default=2048, help="examples per guided sampling step")
    args = ap.parse_args()
    raw = yaml.safe_load(Path("params.yaml").read_text())
    if args.preset:
        raw = merged_params(raw, flat_overrides(yaml.safe_load(Path(args.preset).read_text())))
    params = params_from_dict(raw)
    device = resolve_device(params.train.device)
    configure_cuda()
    m, t = params.model, params.train
    size = params.data.image_size or {"digits": 16}.get(params.data.name, 32)
    channels = 3 if params.data.name in ("cifar10", "image_folder") else 1
    config = UNetConfig.from_params(m, image_size=size, in_channels=channels, num_classes=10)
    peak = matmul_rate(device, args.seconds)
    batch = args.batch or t.batch_size
    rows = []
    variants = [("fp32 eager", False, False)]
    if device.type == "cuda":
        variants += [("bf16 eager", True, False), ("bf16 compile", True, True)]
    for name, bf16, compile_ in variants:
        rows += bench_variant(name, config, device, bf16, compile_, batch, args.sample_batch, args.seconds)

    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(
        f"\ndevice {dev_name}, torch {torch.__version__}; model {size}x{size}x{channels}, "
        f"base_width {m.base_width}, mult {m.channel_mult}; measured matmul rate {peak / 1e12:.3f} TFLOP/s"
    )
    print(f"{'what':<26}{'batch':>8}{'images/s':>14}{'TFLOP/s':>10}{'of peak':>9}")
    for what, b, ips, flops in rows:
        print(f"{what:<26}{b:>8}{ips:>14,.0f}{flops / 1e12:>10.3f}{flops / peak:>9.1%}")


if __name__ == "__main__":
    main()
