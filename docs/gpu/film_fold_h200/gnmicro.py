# GroupNorm apply formulations inside one real ResBlock(64 -> 64) at the sampling step's shape.
#   python .gpu/gnmicro.py VARIANT [batch]   (one variant a process; TORCH_LOGS=output_code outside for the code)
# As run in call 2, on 850e0f1's cfg: there "current" was the modulation after GroupNorm. cfg's GroupNorm now folds
# it itself, so on later code "current" measures the fold; the other variants replace GroupNorm's forward and
# ResBlock's and stay as they were.
import sys, torch, torch.nn.functional as F
from torch import nn
from cfg.engine.device import configure_cuda, compile_net
from cfg.nets import unet as U
variant = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 7500
C = int(sys.argv[3]) if len(sys.argv) > 3 else 64
configure_cuda()

def stats(self, x):
    b, c = x.shape[:2]; g = self.num_groups
    xf = x.float()
    var_c, mean_c = torch.var_mean(xf, dim=(2, 3), correction=0)
    mean_c, var_c = mean_c.view(b, g, -1), var_c.view(b, g, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    rstd = torch.rsqrt((var_c + (mean_c - mean_g) ** 2).mean(-1, keepdim=True) + self.eps)
    scale = (rstd * self.weight.float().view(1, g, -1)).view(b, c)
    shift = (self.bias.float().view(1, g, -1) - mean_g * scale.view(b, g, -1)).view(b, c)
    return xf, scale, shift

def apply_nchw(xf, a, s):
    b, c = a.shape
    return xf * a.view(b, c, 1, 1) + s.view(b, c, 1, 1)

def apply_nhwc(xf, a, s):
    return (xf.permute(0, 2, 3, 1) * a[:, None, None, :] + s[:, None, None, :]).permute(0, 3, 1, 2)

def gn_forward(self, x, film=None):
    if not U._compiled_channels_last(x):
        out = nn.GroupNorm.forward(self, x)
        if film is not None:
            out = out * (1 + film[0]) + film[1]
        return out
    xf, a, s = stats(self, x)
    if film is not None and "fold" in variant:
        fs, ft = (t.float().flatten(1) for t in film)
        a, s = a * (1 + fs), s * (1 + fs) + ft
        film = None
    out = (apply_nhwc if "nhwc" in variant else apply_nchw)(xf, a, s)
    if film is not None:
        out = out * (1 + film[0]) + film[1]
    return out

def res_forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h, (scale, shift))
    h = self.conv2(self.dropout(F.silu(h)))
    return self.skip(x) + h

if variant != "current":
    U.GroupNorm.forward = gn_forward
    U.ResBlock.forward = res_forward

torch.manual_seed(0)
blk = U.ResBlock(C, C, 256, 0.1).cuda().to(memory_format=torch.channels_last).eval()
for p in blk.parameters():
    p.data.add_(0.02 * torch.randn_like(p))
x = torch.randn(B, C, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
emb = torch.randn(B, 256, device="cuda")
net = compile_net(blk)
def step():
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        return net(x, emb)
ref = None
with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
    ref = blk(x, emb).float()  # eager, native GroupNorm
out = step().float()
err = ((out - ref).abs().max() / ref.abs().max()).item()
for _ in range(5): step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10): step()
    torch.cuda.synchronize()
tot = {}
for e in prof.key_averages():
    if e.device_type.name == "CUDA":
        tot[e.key] = (e.device_time_total / 10, e.count / 10)
tri = sum(t for k, (t, n) in tot.items() if k.startswith("triton"))
allk = sum(t for t, n in tot.values())
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
for _ in range(20): step()
b.record(); b.synchronize()
print(f"== {variant} B={B} C={C}: {a.elapsed_time(b)/20:.3f} ms/block wall, kernels {allk/1000:.3f} ms, triton {tri/1000:.3f} ms; rel err vs eager {err:.2e}")
for k, (t, n) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:8]:
    print(f"   {t/1000:7.3f} ms x{n:.0f} {k[:110]}")
