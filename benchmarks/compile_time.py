"""Cold compile time of the preset U-Net's training step per `train.compile` setting, each in a fresh process with
empty Inductor and Triton caches: how long its first forward + backward takes (tracing, AOTAutograd, Inductor,
the kernels' compilation), a later step's time, and how many graphs Dynamo compiled. On a GPU with bf16 autocast
and channels-last as the train stage runs it; on CPU (Inductor's C++ backend) the same network in float32, where
the compile's Python side is the same work and the kernels differ.

    python benchmarks/compile_time.py [--preset presets/fashion_mnist_gpu.yaml] [--settings default,regional]
                                      [--batch 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
from profile_step import cold_cache_env, preset_params, preset_unet  # benchmarks/, the script's own folder

from cfg.engine.device import COMPILE_MODES, autocast, compile_as, configure_cuda
from cfg.nets.unet import UNet


def one(preset: str, setting: str, batch: int, steps: int) -> dict:
    """The measurement in this process (its caches as the caller set them)."""
    from torch._dynamo.utils import counters

    params = preset_params(preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_cuda()
    config = preset_unet(params)
    size = config.image_size
    torch.manual_seed(0)
    model = UNet(config).to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = compile_as(model, setting)  # the stages compile on CUDA only; here the CPU compiles the same way
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    lam = torch.linspace(-10, 10, batch, device=device)
    labels = torch.arange(batch, device=device) % 10

    def step() -> None:
        with autocast(device, True):
            out = net(x, lam, labels)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    step()  # a step that may still compile (autotuning, a recompile) is not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return {
        "setting": setting,
        "device": name,
        "batch": batch,
        "first_s": first,
        "step_s": (time.perf_counter() - t0) / steps,
        "graphs": int(counters["stats"]["unique_graphs"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="presets/fashion_mnist_gpu.yaml")
    ap.add_argument("--settings", default="default,regional", help=f"of {', '.join(COMPILE_MODES)}")
    ap.add_argument(
        "--batch", type=int, default=None, help="default: the preset's train.batch_size on a GPU, 8 on CPU"
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first two")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = args.settings.split(",")
    if unknown := set(settings) - set(COMPILE_MODES):
        ap.error(f"--settings {args.settings}: unknown {sorted(unknown)}; use {', '.join(COMPILE_MODES)}")
    batch = args.batch or (preset_params(args.preset).train.batch_size if torch.cuda.is_available() else 8)
    if args.child:
        print(json.dumps(one(args.preset, args.child, batch, args.steps)))
        return
    rows, failed = [], []
    for setting in settings:
        with tempfile.TemporaryDirectory(prefix="cfg-compile-") as tmp:
            env = cold_cache_env(tmp)
            cmd = [
                sys.executable, __file__, "--preset", args.preset, "--batch", str(batch),
                "--steps", str(args.steps), "--child", setting,
            ]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = out.stdout.strip().splitlines()
            if out.returncode or not lines:
                print(f"{setting}: exit {out.returncode}: {out.stderr[-400:]}", file=sys.stderr)
                failed.append(setting)
                continue
            rows.append(json.loads(lines[-1]))
    if not rows:
        sys.exit(1)
    print(
        f"device {rows[0]['device']}, torch {torch.__version__}, batch {batch}, each setting cold in its own process"
    )
    print(f"{'setting':<20} {'first step s':>12} {'step s':>9} {'graphs':>6}")
    for r in rows:
        print(f"{r['setting']:<20} {r['first_s']:>12.1f} {r['step_s']:>9.3f} {r['graphs']:>6}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (output above)")


if __name__ == "__main__":
    main()
