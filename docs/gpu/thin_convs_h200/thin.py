# the stem and output convolutions alone at the sampling step's shape: cuDNN (padded) against tap_conv
import sys, os, torch
from torch.profiler import ProfilerActivity, profile
from torch._inductor.utils import run_and_get_code
from cfg.nets import unet
from cfg.nets.unet import Conv2d, GroupNorm
from cfg.engine.device import COMPILE_OPTIONS, configure_cuda
configure_cuda()
out_dir = os.environ.get("OUT", "/tmp")
cl = torch.channels_last
stem = Conv2d(1, 64, 3, padding=1).cuda().to(memory_format=cl)
head = torch.nn.Sequential(GroupNorm(32, 64), torch.nn.SiLU(), Conv2d(64, 1, 3, padding=1)).cuda().to(memory_format=cl)
z = torch.randn(7500, 1, 32, 32, device="cuda")
h = torch.randn(7500, 64, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
for variant in ("taps", "cudnn"):
    taps = {"cuda": 4} if variant == "taps" else {}
    unet._TAP_CHANNELS = taps
    for name, mod, x in (("head", head, h),):
        torch._dynamo.reset()
        f = torch.compile(mod, options=dict(COMPILE_OPTIONS))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            _, code = run_and_get_code(f, x)
            open(f"{out_dir}/{variant}_{name}.py", "w").write("\n\n".join(code))
            for _ in range(5): f(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10): f(x)
                torch.cuda.synchronize()
        tot = 0
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total <= 0: continue
            us = e.device_time_total / 10; tot += us
            print(f"{variant:6} {name:5} {us:8.1f} us/call x{e.count // 10} {e.key[:110]}")
        print(f"{variant:6} {name:5} total {tot:8.1f} us per call", flush=True)
