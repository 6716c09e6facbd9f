"""Training and sampling throughput of the U-Net, and the fraction of the device's matmul rate it reaches.

    python benchmarks/bench_throughput.py [--preset presets/fashion_mnist_gpu.yaml] [--seconds 10]
        [--device auto|cpu|cuda] [--batch N] [--sample-batch N] [--no-peer]

Prints one table: images per second for training steps and for guided sampling steps (the doubled
conditional + unconditional batch counts as one image per example), model TFLOP/s (FLOPs per image from
torch's FLOP counter × images/s) and that rate over the measured dense matmul rate of the device
(bf16 on CUDA, fp32 on CPU).

When `diffusers` is importable (`pip install -e '.[bench]'`; never a runtime dependency) every row is
measured a second time, in the same run, on diffusers' `UNet2DModel` built to the same architecture
(`peer_unet`), with the same FLOP counter, inputs, loss, guided step, autocast, memory format, compile
setting and timing loop; its rows carry the ratio cfg-lab images/s ÷ diffusers images/s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cfg.engine.device import autocast, compile_net, configure_cuda, resolve_device
from cfg.io import load_yaml
from cfg.maths.diffusion import diffusion_loss
from cfg.maths.guidance import guided_eps
from cfg.nets.unet import UNet, UNetConfig, _norm, count_parameters
from cfg.study.config import params_from_dict
from cfg.study.presets import flat_overrides, merged_params

PEER_HINT = "pip install -e '.[bench]' (or pip install 'diffusers>=0.30')"


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
    """FLOPs of one forward (train: forward + backward) per image, from torch's FLOP counter.

    Attention runs in SDPA's math backend while counting: the counter has formulas for the CUDA fused
    kernels but none for the CPU flash kernel, so without this a model whose q, k, v are contiguous
    (diffusers) would count no attention on CPU while one with strided q, k, v (cfg-lab, math fallback) would.
    The math backend's two batched matmuls are the FLOPs the counter assigns the fused kernels, so CUDA
    counts are unchanged and every model and device is counted the same way."""
    x = torch.randn(8, config.in_channels, config.image_size, config.image_size, device=device)
    lam = torch.zeros(8, device=device)
    y = torch.zeros(8, dtype=torch.long, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, lam, y)
        if train:
            out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def diffusers_version() -> str | None:
    """diffusers' version when its `UNet2DModel` imports, else None (the reason printed). diffusers imports
    lazily: the package can import while the model does not (e.g. an installed transformers/peft that wants
    another huggingface_hub), so the model itself is imported here, before any row is timed."""
    try:
        import diffusers
        from diffusers import UNet2DModel  # noqa: F401
    except Exception as e:  # not installed, or broken against this torch / huggingface_hub / peft
        if not isinstance(e, ModuleNotFoundError) or e.name != "diffusers":
            print(f"diffusers does not import here: {(str(e).splitlines() or [type(e).__name__])[-1]}")
        return None
    return diffusers.__version__


class PeerUNet(torch.nn.Module):
    """diffusers' `UNet2DModel` behind cfg-lab's ε_θ(z, λ, c) signature, built to the architecture of a
    `UNetConfig`, so that the training loss and the guided step call it exactly as they call `UNet`.

    Which peer: the preset's own architecture, not the issue's 14.7 M-parameter / 4.4 GFLOP diffusers
    configuration. With the same blocks both networks have the same parameters and the same FLOPs under one
    counter (7,281,217 and 9.67 GFLOP per training image for presets/fashion_mnist_gpu.yaml), so the images/s
    ratio measures the implementations alone; a peer of another size would mix model size into it.

    Block for block: ADM residual blocks with the embedding as scale and shift ("scale_shift"), a 1x1 skip
    where the width changes, self-attention after every residual block at the attention resolutions and in
    the middle (the middle one with its GroupNorm: attn_norm_num_groups), strided-conv down- and
    nearest+conv up-sampling, layers_per_block + 1 blocks per up level, a 4x-width embedding of sinusoids
    of the noise level plus a class embedding with one extra row for the null label. Differences, none
    of them counted FLOPs: diffusers uses one GroupNorm group count for every layer (cfg-lab gcd(32, C):
    the same whenever every width is ≥ 32, as in the preset), q, k, v are three linears rather than one
    1x1 convolution (same parameters and FLOPs), and the timestep embedding reads λ·lambda_scale."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        levels = len(config.channel_mult)
        attn = [config.image_size // 2**level in config.attention_resolutions for level in range(levels)]
        self.unet = UNet2DModel(
            sample_size=config.image_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            block_out_channels=tuple(config.base_width * m for m in config.channel_mult),
            layers_per_block=config.blocks_per_level,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            downsample_type="conv",
            upsample_type="conv",
            attention_head_dim=config.head_channels,
            norm_num_groups=_norm(config.base_width).num_groups,
            attn_norm_num_groups=_norm(config.base_width * config.channel_mult[-1]).num_groups,
            resnet_time_scale_shift="scale_shift",
            dropout=config.dropout,
            num_class_embeds=config.num_classes + 1,  # + the null label
        )

    def forward(self, z: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, lam * self.config.lambda_scale, class_labels=labels, return_dict=False)[0]


def bench_variant(
    name: str,
    build: Callable[[UNetConfig], torch.nn.Module],
    config: UNetConfig,
    device: torch.device,
    bf16: bool,
    compile_: bool,
    batch: int,
    nb: int,
    seconds: float,
) -> list[tuple[str, int, float, float]]:
    """(what, batch, images/s, model FLOP/s) of a training step and a guided sampling step."""
    c, size, null = config.in_channels, config.image_size, config.null_label
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    model = build(config).to(device).to(memory_format=fmt)
    fwd_bwd = flops_per_image(model, config, device, train=True)
    fwd = flops_per_image(model, config, device, train=False)
    net = compile_net(model) if compile_ else model  # the same compile options for cfg-lab and the peer
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, c, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, config.num_classes, (batch,), device=device)

    def train_step() -> None:
        with autocast(device, bf16):
            loss = diffusion_loss(net, x, y, p_uncond=0.1, null_label=null)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = [(f"train {name}", batch, batch / (s := timed(train_step, device, seconds)), fwd_bwd * batch / s)]
    model.eval()
    z = torch.randn(nb, c, size, size, device=device).contiguous(memory_format=fmt)
    lab = torch.randint(0, config.num_classes, (nb,), device=device)
    w = torch.linspace(-1, 4, nb, device=device)
    lam = torch.zeros(nb, device=device)

    def sample_step() -> None:
        with torch.no_grad(), autocast(device, bf16):
            guided_eps(net, z, lam, lab, w, null)

    s = timed(sample_step, device, seconds)
    rows.append((f"sample step {name}", nb, nb / s, 2 * fwd * nb / s))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", help="preset YAML applied over params.yaml (e.g. presets/fashion_mnist_gpu.yaml)"
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="timing budget per row (at least 5 calls)")
    ap.add_argument("--device", help="auto, cpu or cuda (default: train.device)")
    ap.add_argument("--batch", type=int, help="training batch (default: train.batch_size)")
    ap.add_argument("--sample-batch", type=int, default=2048, help="examples per guided sampling step")
    ap.add_argument(
        "--no-peer", action="store_true", help="skip the diffusers rows even when it is installed"
    )
    args = ap.parse_args()
    raw = load_yaml(Path("params.yaml").read_text())
    if args.preset:
        raw = merged_params(raw, flat_overrides(load_yaml(Path(args.preset).read_text())))
    params = params_from_dict(raw)
    device = resolve_device(args.device or params.train.device)
    configure_cuda()
    m, t = params.model, params.train
    size = params.data.image_size or {"digits": 16}.get(params.data.name, 32)
    channels = 3 if params.data.name in ("cifar10", "image_folder") else 1
    config = UNetConfig.from_params(m, image_size=size, in_channels=channels, num_classes=10)
    peer_version = None if args.no_peer else diffusers_version()
    models: list[tuple[str, Callable[[UNetConfig], torch.nn.Module]]] = [("cfg-lab", UNet)]
    if peer_version:
        models.append((f"diffusers {peer_version}", PeerUNet))
    peak = matmul_rate(device, args.seconds)
    batch = args.batch or t.batch_size
    variants = [("fp32 eager", False, False)]
    if device.type == "cuda":
        variants += [("bf16 eager", True, False), ("bf16 compile", True, True)]
    rows = []  # (what, model, batch, images/s, FLOP/s)
    breaks: dict[str, int] = {}
    for name, bf16, compile_ in variants:
        for label, build in models:
            torch._dynamo.utils.counters.clear()
            for what, b, ips, flops in bench_variant(
                name, build, config, device, bf16, compile_, batch, args.sample_batch, args.seconds
            ):
                rows.append((what, label, b, ips, flops))
            if compile_:
                breaks[label] = sum(torch._dynamo.utils.counters["graph_break"].values())

    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(
        f"\ndevice {dev_name}, torch {torch.__version__}; model {size}x{size}x{channels}, "
        f"base_width {m.base_width}, mult {m.channel_mult}; measured matmul rate {peak / 1e12:.3f} TFLOP/s"
    )
    print("FLOPs per image from torch's FlopCounterMode (attention counted in SDPA's math backend):")
    for label, build in models:
        net = build(config).to(device)
        what = "cfg-lab UNet" if build is UNet else f"{label} UNet2DModel"
        print(
            f"  {what:<30}{count_parameters(net):>12,} parameters"
            f"{flops_per_image(net, config, device, train=True):>18,.0f} FLOP train"
            f"{flops_per_image(net, config, device, train=False):>17,.0f} FLOP forward"
        )
    if breaks:
        print("graph breaks in the compiled rows: " + ", ".join(f"{k} {v}" for k, v in breaks.items()))
    head = f"{'what':<26}{'model':<18}{'batch':>7}{'images/s':>13}{'TFLOP/s':>10}{'of peak':>9}"
    print(head + (f"{'cfg-lab/peer':>14}" if peer_version else ""))
    ours = {what: ips for what, label, _, ips, _ in rows if label == "cfg-lab"}
    order = list(ours)  # each cfg-lab row, then its peer row
    for what, label, b, ips, flops in sorted(rows, key=lambda r: order.index(r[0])):
        ratio = "" if label == "cfg-lab" else f"{ours[what] / ips:>13.2f}x"
        print(f"{what:<26}{label:<18}{b:>7}{ips:>13,.1f}{flops / 1e12:>10.3f}{flops / peak:>9.1%}{ratio}")
    if not peer_version:
        why = "--no-peer" if args.no_peer else "diffusers is not importable"
        print(f"peer rows (diffusers UNet2DModel) skipped: {why}; to get them: {PEER_HINT}")


if __name__ == "__main__":
    main()
