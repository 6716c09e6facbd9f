# q = (mean² + var) / (var + eps) of every group of every GroupNorm of the embedded default's trained network
# (models/p_uncond=0.1, after `cfg-lab repro`), on its prepared test images noised at 9 log-SNRs; CPU, float64.
#   python docs/gpu/sum_statistics_h200/q_embedded.py
import torch

from cfg.data.datasets import load_prepared
from cfg.nets import unet as U

net, _ = U.load_checkpoint("models/p_uncond=0.1/checkpoint.pt")
net = net.eval().double()
net.lambda_embed.register_forward_pre_hook(lambda m, a: (a[0].double(),))  # the sinusoids come as float32
qs = {}


def hook(name):
    def record(mod, args):
        xg = args[0].reshape(args[0].shape[0], mod.num_groups, -1)
        m, v = xg.mean(-1), xg.var(-1, unbiased=False)
        qs.setdefault(name, []).append(((m * m + v) / (v + mod.eps)).flatten())

    return record


for name, mod in net.named_modules():
    if isinstance(mod, U.GroupNorm):
        mod.register_forward_pre_hook(hook(name))
torch.manual_seed(0)
ds = load_prepared("data/prepared.pt")
x0, y = ds.test_x.double(), ds.test_y
for lam in torch.linspace(-12, 12, 9, dtype=torch.float64):
    z = torch.sigmoid(lam).sqrt() * x0 + torch.sigmoid(-lam).sqrt() * torch.randn_like(x0)
    with torch.no_grad():
        net(z, torch.full((len(z),), float(lam), dtype=torch.float64), y)
q = torch.cat([torch.cat(v) for v in qs.values()])
print(f"{len(x0)} test images, {len(qs)} GroupNorms, {q.numel()} groups x images x levels")
print(
    "q quantiles 0.5 / 0.99 / 0.999 / max:",
    " / ".join(
        f"{t:.1f}" for t in torch.quantile(q, torch.tensor([0.5, 0.99, 0.999, 1.0], dtype=torch.float64))
    ),
)
worst = max(qs, key=lambda k: torch.cat(qs[k]).max())
print(f"largest in {worst}: {torch.cat(qs[worst]).max():.1f}")
