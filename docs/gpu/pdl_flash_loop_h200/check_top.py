"""top_kernels' per-launch table against the profiler's own key_averages, on a step of known kernels."""
import os, csv, sys
from pathlib import Path
import torch
from torch.profiler import profile, ProfilerActivity
import profile_step as ps

a, b = torch.randn(4096, 4096, device="cuda"), torch.randn(1024, 1024, device="cuda")
def step():
    a @ a; b @ b; b @ b; torch.relu(a)
out = Path(os.environ["OUT"]) / "check.csv"
wall, lines, k = ps.top_kernels(step, calls=5, csv_path=out)
print("\n".join(lines))
rows = list(csv.DictReader(out.open()))
for r in rows: print(r)
# the same steps again through key_averages: counts per name must match launches_per_step * calls
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5): step()
    torch.cuda.synchronize()
avg = {e.key: e.count for e in prof.key_averages() if e.self_device_time_total > 0}
mine = {r["kernel"]: float(r["launches_per_step"]) * 5 for r in rows}
print("counts equal:", avg == mine, avg, mine)
assert all(float(r["us_min"]) <= float(r["us_per_launch"]) <= float(r["us_max"]) for r in rows)
print("min <= mean <= max: ok")
