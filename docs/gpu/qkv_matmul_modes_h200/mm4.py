# one process: the qkv addmm at 16x16 (mean of 10 launches, CUDA events), and the kernel's launch config
import json, os, torch, torch.nn.functional as F
from timing import event_us
from torch.profiler import ProfilerActivity, profile
M, C = 7500 * 256, 128
bf = dict(device="cuda", dtype=torch.bfloat16)
w = (torch.rand(3 * C, C, **bf) * 2 - 1) / C**0.5; b = torch.randn(3 * C, **bf) * 0.01
x = torch.randn(M, C, **bf)
def t(fn):
    return event_us(fn, n=10, warm=2)
r1 = t(lambda: F.linear(x, w, b))
with profile(activities=[ProfilerActivity.CUDA]) as p:
    F.linear(x, w, b); torch.cuda.synchronize()
p.export_chrome_trace("/tmp/t.json")
k = [e for e in json.load(open("/tmp/t.json"))["traceEvents"] if e.get("cat") == "kernel"]
a = k[-1]["args"]
print(f"pid {os.getpid()}: {r1:7.1f} us  {k[-1]['name'][:50]} grid {a.get('grid')} dur {k[-1]['dur']:.0f}")
