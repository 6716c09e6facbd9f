# does the qkv addmm's time depend on the data? 16x16 shape of the preset's sampling step
import torch, torch.nn.functional as F
from timing import event_us
def t(fn):
    return event_us(fn, n=20, warm=3)
B, C = 7500, 128
bf = dict(device="cuda", dtype=torch.bfloat16)
for hw in (256, 64):
    M = B * hw
    xs = {"x randn": torch.randn(M, C, **bf), "x zeros": torch.zeros(M, C, **bf), "x 0.01*randn": 0.01 * torch.randn(M, C, **bf)}
    ws = {"w randn": torch.randn(3 * C, C, **bf), "w U(+-1/sqrt C)": (torch.rand(3 * C, C, **bf) * 2 - 1) / C**0.5, "w zeros": torch.zeros(3 * C, C, **bf)}
    b = torch.zeros(3 * C, **bf)
    for xn, x in xs.items():
        for wn, w in ws.items():
            print(f"hw={hw:4d} {xn:<14} {wn:<16} {t(lambda: F.linear(x, w, b)):8.1f} us")
