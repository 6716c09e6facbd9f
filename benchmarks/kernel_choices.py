"""Which cuDNN / SDPA kernel one layer of the preset U-Net gets, and how fast, at the batch a stage runs it: the
choices behind cfg's channel padding (`cfg.nets.unet._CHANNEL_MULTIPLE`) and PyTorch's attention backend.

    python benchmarks/kernel_choices.py [--only conv,sdpa] [--batch 7500]

  conv   the output convolution 64 -> c_out (1, the preset's; 8, 16, 32 padded; 64) and the stem c_in -> 64 (8, 16),
         bf16 channels-last, with cuDNN's autotuning on and off (the sample stage runs its heuristics); µs per call
         and the kernels torch.profiler saw
  sdpa   scaled_dot_product_attention per backend at the preset's attention shapes (4 heads of 32 channels, 16×16
         and 8×8 tokens; q, k, v strided views of one tensor as AttentionBlock makes them): forward at the sampling
         batch, forward + backward at the training batch (256; autograd's own work included, so launch-bound)

--batch: the rows of one network call (7,500: the guided sampling step's 3,750 examples, both passes). On a CUDA GPU.
Measured on one H200: docs/gpu/channel_padding_h200.txt (conv), docs/gpu/sdpa_backends_h200.txt (sdpa).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile


def mean_us(fn, calls: int = 20) -> float:
    """Mean µs per call over `calls` back-to-back calls after 3, with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / calls * 1e3


def kernels(fn) -> str:
    """The kernels of one call, with their µs."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return "; ".join(f"{e.key[:90]} {e.self_device_time_total:.0f} µs" for e in events)


def conv_rows(batch: int) -> None:
    cl, bf16 = torch.channels_last, torch.bfloat16
    for autotune in (True, False):
        torch.backends.cudnn.benchmark = autotune
        print(f"cudnn.benchmark = {autotune}")
        x = torch.randn(batch, 64, 32, 32, device="cuda", dtype=bf16).contiguous(memory_format=cl)
        for c_out in (1, 8, 16, 32, 64):
            w = torch.randn(c_out, 64, 3, 3, device="cuda", dtype=bf16).contiguous(memory_format=cl)
            fn = lambda x=x, w=w: F.conv2d(x, w, None, padding=1)  # noqa: E731
            print(f"  output conv 64 -> {c_out:<3} {mean_us(fn):8.0f} µs | {kernels(fn)}", flush=True)
        for c_in in (8, 16):
            z = torch.randn(batch, c_in, 32, 32, device="cuda", dtype=bf16).contiguous(memory_format=cl)
            w = torch.randn(64, c_in, 3, 3, device="cuda", dtype=bf16).contiguous(memory_format=cl)
            fn = lambda z=z, w=w: F.conv2d(z, w, None, padding=1)  # noqa: E731
            print(f"  stem conv {c_in:<3} -> 64 {mean_us(fn):8.0f} µs | {kernels(fn)}", flush=True)


BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def sdpa_rows(batch: int) -> None:
    for rows, tokens, train in ((batch, 256, False), (batch, 64, False), (256, 256, True), (256, 64, True)):
        heads, d = 4, 32
        qkv = torch.randn(rows, tokens, 3, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=train)

        def run(qkv=qkv, train=train):
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, heads, tokens, d)
            out = F.scaled_dot_product_attention(q, k, v)
            if train:
                out.backward(torch.ones_like(out))
            return out

        cells, ref = [], run().detach().float()  # PyTorch's own choice first
        cells.append(f"default {mean_us(run):7.0f} µs")
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    us, out = mean_us(run), run().detach().float()
                cells.append(f"{name} {us:7.0f} µs (diff {((out - ref).norm() / ref.norm()).item():.0e})")
            except RuntimeError as e:  # a backend that does not take these inputs
                cells.append(f"{name}: {str(e)[:50]}")
        what = "fwd + bwd" if train else "fwd"
        print(f"B={rows} tokens={tokens} {what}: " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="conv,sdpa", help="comma-separated parts: conv, sdpa")
    parser.add_argument("--batch", type=int, default=7500, help="rows of one network call in sampling")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if unknown := parts - {"conv", "sdpa"}:
        raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; use conv, sdpa")
    if not torch.cuda.is_available():
        raise SystemExit("kernel_choices.py measures CUDA kernels: no CUDA GPU is visible")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if "conv" in parts:
        conv_rows(args.batch)
    if "sdpa" in parts:
        sdpa_rows(args.batch)


if __name__ == "__main__":
    main()
