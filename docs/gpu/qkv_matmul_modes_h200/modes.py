# next session: what puts the qkv matmul in its fast way (docs/gpu/qkv_matmul_modes_h200.txt)? One variant a process:
#   base | plain-mm-first | recompile | clear-workspaces | lt-1mib | lt-64mib | ws-cache (the env ones set by modes.sh)
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from profile_step import preset_params, preset_unet, sample_fn, cudnn_autotuning
from cfg.engine.device import configure_cuda
variant = sys.argv[1]
configure_cuda()
config = preset_unet(preset_params("presets/fashion_mnist_gpu.yaml"))
K = "nvjet_sm90_tst_192x192"
if variant == "plain-mm-first":
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(10): a @ a
def measure(tag, step):
    for _ in range(3): step()
    torch.cuda.synchronize()
    if variant == "clear-workspaces":
        torch._C._cuda_clearCublasWorkspaces()
        for _ in range(2): step()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3): step()
        torch.cuda.synchronize()
    prof.export_chrome_trace("/tmp/m.json")
    ev = [e for e in json.load(open("/tmp/m.json"))["traceEvents"] if e.get("cat") == "kernel" and e["name"].startswith(K)]
    big = [e["dur"] for e in ev if e["dur"] > 400]
    print(f"{variant:<16} {tag:<8} mean {sum(e['dur'] for e in ev) / len(ev):6.1f} us x {len(ev)}; 16x16 {min(big):.0f}-{max(big):.0f}", flush=True)
with cudnn_autotuning(True):
    measure("first", sample_fn(config, torch.channels_last, "default", 3750))
    if variant == "recompile":
        torch._dynamo.reset(); torch.cuda.empty_cache()
        measure("second", sample_fn(config, torch.channels_last, "default", 3750))
