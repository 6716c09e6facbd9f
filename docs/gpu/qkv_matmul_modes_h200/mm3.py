# the qkv addmm (7500 x 16 x 16 rows, C = 128 -> 384, bf16, bias) against where its input and output lie in memory
import torch
from timing import event_us
def t(fn):
    return event_us(fn, n=10, warm=2)
M, C = 7500 * 256, 128
bf = dict(device="cuda", dtype=torch.bfloat16)
w = (torch.rand(3 * C, C, **bf) * 2 - 1) / C**0.5
b = torch.zeros(3 * C, **bf)
nin, nout = M * C, M * 3 * C
arena = torch.empty(nin + nout + (1 << 30), **bf)  # + 2 GiB of room for offsets
arena.normal_()
MB = (1 << 20) // 2  # elements of one MiB
print("input at 0, output at input's end + d:")
for d in [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024]:
    x = arena[:nin].view(M, C); out = arena[nin + d * MB : nin + d * MB + nout].view(M, 3 * C)
    print(f"  d = {d:5d} MiB  {t(lambda: torch.addmm(b, x, w.t(), out=out)):7.1f} us")
print("output at 0, input at output's end + d:")
for d in [0, 1, 2, 4, 8, 16, 64, 256, 1024]:
    out = arena[:nout].view(M, 3 * C); x = arena[nout + d * MB : nout + d * MB + nin].view(M, C)
    print(f"  d = {d:5d} MiB  {t(lambda: torch.addmm(b, x, w.t(), out=out)):7.1f} us")
del arena
torch.cuda.empty_cache()
print("fresh allocations after a spacer of s MiB:")
for s in [0, 2, 6, 14, 30, 62, 126, 254, 510]:
    sp = torch.empty(s * MB + 1, **bf); x = torch.randn(M, C, **bf); out = torch.empty(M, 3 * C, **bf)
    r = t(lambda: torch.addmm(b, x, w.t(), out=out))
    print(f"  s = {s:4d} MiB  {r:7.1f} us  x at {x.data_ptr() % (1 << 30):#x}, out at {out.data_ptr() % (1 << 30):#x}")
    del sp, x, out
