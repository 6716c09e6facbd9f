"""The sample stage's sampling loop with and without the non-finite check (8f6e569), same process, same GPU:
the preset's network (random weights, perturbed), 15 w, batch 3750 rows, ancestral T = 64, compiled."""
import importlib.util, sys, time
from pathlib import Path
import torch, yaml
sys.path.insert(0, ".")
from cfg.io import load_yaml
from cfg.study.presets import flat_overrides, merged_params
from cfg.study.config import params_from_dict
from cfg.nets.unet import UNet, UNetConfig
import cfg.engine.generate as new

spec = importlib.util.spec_from_file_location("generate_old", ".device/generate_old.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)

raw = merged_params(load_yaml(Path("params.yaml").read_text()), flat_overrides(load_yaml(Path("presets/fashion_mnist_gpu.yaml").read_text())))
raw["data"]["root"] = None
params = params_from_dict(raw)
m = params.model
torch.manual_seed(0)
net = UNet(UNetConfig(image_size=32, in_channels=1, num_classes=10, base_width=m.base_width, channel_mult=tuple(m.channel_mult),
                      blocks_per_level=m.blocks_per_level, attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout,
                      head_channels=m.head_channels))
with torch.no_grad():
    for p in net.parameters():
        p.add_(0.02 * torch.randn_like(p))
net = net.cuda().eval()
kw = new.sampling_kwargs(params)
w = list(params.sample.w)
print(torch.cuda.get_device_name(), torch.__version__, "w", len(w), "batch", kw["batch_size"], "T", kw["steps"], "compile", kw["compile"], flush=True)
N = 500  # examples: 2 batches of 250 x 15 w
def run(mod):
    torch.cuda.synchronize(); t = time.perf_counter()
    images, labels = mod.generate_w_grid(net, w, N, num_classes=10, image_shape=(1, 32, 32), device="cuda", **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t, images
for name, mod in (("old", old), ("new", new)):
    s, _ = run(mod); print(f"warm-up {name}: {s:.1f} s", flush=True)
times = {"old": [], "new": []}
ref = None
for r in range(3):
    for name, mod in (("old", old), ("new", new)):
        s, images = run(mod)
        times[name].append(s)
        if ref is None: ref = images
        assert torch.equal(images, ref), name
        print(f"round {r} {name}: {s:.3f} s, {len(w) * N / s:,.0f} images/s", flush=True)
for name, t in times.items():
    print(f"{name}: median {sorted(t)[1]:.3f} s per {len(w) * N} images ({len(w) * N / sorted(t)[1]:,.0f} images/s); all {', '.join(f'{x:.3f}' for x in t)}")
print("images identical across old and new: True")
