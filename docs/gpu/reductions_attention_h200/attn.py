# Attention at the preset's shapes: SDPA backends against flex_attention and a compiled math attention.
# q, k, v as the model makes them: views of a (B, HW, 3, heads, d) channels-last qkv tensor.
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

torch.backends.cuda.matmul.allow_tf32 = True
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=False)


def math_attn(q, k, v):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.softmax(-1).to(v.dtype) @ v


math_c = torch.compile(math_attn, dynamic=False)


def views(b, L, heads=4, d=32, grad=False):
    qkv = torch.randn(b, L, 3, heads, d, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    return qkv, [t.transpose(1, 2) for t in qkv.unbind(2)]


def timeit(fn, n=None, secs=1.0):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    end = time.perf_counter() + secs
    while time.perf_counter() < end or len(ts) < 5:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def variants():
    out = {}
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def f(q, k, v, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v)
        out[name] = f
    out["flex"] = lambda q, k, v: flex(q, k, v)
    out["flex-contig"] = lambda q, k, v: flex(q.contiguous(), k.contiguous(), v.contiguous())
    out["math-compiled"] = math_c
    return out


print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
ref = None
for L, b_s, b_t in [(256, 7500, 256), (64, 7500, 256)]:
    for mode, b in [("fwd", b_s), ("fwd+bwd", b_t)]:
        qkv, (q, k, v) = views(b, L, grad=mode != "fwd")
        g = torch.randn(b, 4, L, 32, device=dev, dtype=torch.bfloat16)
        base = None
        for name, f in variants().items():
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        o = f(q, k, v)
                        ms = timeit(lambda: f(q, k, v))
                else:
                    def step():
                        qkv.grad = None
                        f(q, k, v).backward(g)
                    o = f(q, k, v)
                    ms = timeit(step)
                if base is None:
                    base = o.float()
                err = (o.float() - base).abs().max().item()
                print(f"L={L:4d} b={b:5d} {mode:8s} {name:14s} {ms:8.3f} ms  max|diff| vs cudnn {err:.3g}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"L={L:4d} b={b:5d} {mode:8s} {name:14s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch.cuda.empty_cache()
sys.exit(0)
