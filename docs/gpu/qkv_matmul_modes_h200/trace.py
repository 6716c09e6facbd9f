# per-launch view of the qkv matmul in the preset's guided sampling step: duration, grid/block, the kernel before it
import contextlib, json, sys, torch
from torch.profiler import ProfilerActivity, profile
from profile_step import preset_params, preset_unet, sample_fn, welford_statistics, cudnn_autotuning
from cfg.engine.device import configure_cuda
from cfg.nets import unet
which = sys.argv[1]
configure_cuda()
config = preset_unet(preset_params("presets/fashion_mnist_gpu.yaml"))

def report(tag, step, n=2):
    for _ in range(3): step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): step()
        torch.cuda.synchronize()
    path = f"/tmp/trace_{tag}.json"; prof.export_chrome_trace(path)
    ev = sorted([e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"], key=lambda e: e["ts"])
    print(f"--- {tag}: {len(ev)} kernels in {n} steps")
    for i, e in enumerate(ev):
        if "nvjet_sm90_tst_192x192" in e["name"]:
            a, p = e["args"], ev[i - 1]
            gap = e["ts"] - (p["ts"] + p["dur"])
            print(f"  {e['dur']:8.1f} us grid {a.get('grid')} block {a.get('block')} smem {a.get('shared memory')} regs {a.get('registers per thread')}"
                  f" | gap {gap:6.1f} us after {p['name'][:70]} ({p['dur']:.0f} us)")

ctx = welford_statistics() if which == "welford" else contextlib.nullcontext()
with ctx, cudnn_autotuning(True):
    report(f"{which}_step", sample_fn(config, torch.channels_last, "default", 3750))
    torch._dynamo.reset()
    # the attention block's GroupNorm and qkv matmul alone, compiled, at the 16 x 16 and 8 x 8 shapes
    for hw in (16, 8):
        blk = unet.AttentionBlock(128, 32).cuda().to(memory_format=torch.channels_last).eval()
        f = torch.compile(lambda x: unet.pixel_rows_conv1x1(blk.qkv, blk.norm(x)))
        x = torch.randn(7500, 128, hw, hw, device="cuda").contiguous(memory_format=torch.channels_last)
        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                return f(x.bfloat16())
        report(f"{which}_mini{hw}", step, n=3)
