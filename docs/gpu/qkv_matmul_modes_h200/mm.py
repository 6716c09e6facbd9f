# the qkv addmm's time against its input/output layout, at the preset's sampling shapes (7500 rows of 16x16 / 8x8, C=128)
import torch, torch.nn.functional as F
from timing import event_us
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
def t(fn):
    return event_us(fn, n=20, warm=3)
B, C = 7500, 128
w = torch.randn(3 * C, C, device="cuda", dtype=torch.bfloat16); b = torch.randn(3 * C, device="cuda", dtype=torch.bfloat16)
for hw in (256, 64):
    M = B * hw
    base = torch.randn(M * C + 4096, device="cuda", dtype=torch.bfloat16)
    rows = {
        "contiguous": base[: M * C].view(B, hw, C),
        "offset 8 el": base[8 : 8 + M * C].view(B, hw, C),
        "offset 64 el": base[64 : 64 + M * C].view(B, hw, C),
        "row stride 136": torch.randn(B, hw, 136, device="cuda", dtype=torch.bfloat16)[..., :C],
        "batch stride hw*C+64": torch.as_strided(base, (B, hw, C), (hw * C + 0, C, 1)) if False else None,
        "fresh cl (B,C,H,W) rows": torch.randn(B, C, int(hw**.5), int(hw**.5), device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B, hw, C),
    }
    for name, x in rows.items():
        if x is None: continue
        us = t(lambda: F.linear(x, w, b))
        gb = (M * C + M * 3 * C) * 2 / 1e9
        print(f"hw={hw:4d} {name:<26} {us:8.1f} us  {gb / us * 1e6 / 1e3:6.2f} TB/s  strides={x.stride()} off={x.storage_offset()}")
    out = torch.empty(M, 3 * C, device="cuda", dtype=torch.bfloat16)
    x = base[: M * C].view(M, C)
    print(f"hw={hw:4d} addmm out= preallocated      {t(lambda: torch.addmm(b, x, w.t(), out=out)):8.1f} us")
