# Sums vs Welford GroupNorm statistics in the compiled bf16 sampling forward, against float64 eager, on the preset's
# U-Net trained briefly on real Fashion-MNIST; and q = (mean² + var) / (var + eps) of every GroupNorm group.
import copy, sys, time, torch
sys.path.insert(0, "benchmarks")
import profile_step as P
from cfg.engine.device import configure_cuda, compile_net, autocast
from cfg.maths.diffusion import diffusion_loss
from cfg.data.datasets import load_dataset
from cfg.nets import unet as U
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
configure_cuda()
params = P.preset_params("presets/fashion_mnist_gpu.yaml"); config = P.preset_unet(params)
ds = load_dataset("fashion_mnist", root=".gpu/fm", image_size=config.image_size)
X = ds.train_x.cuda().contiguous(memory_format=torch.channels_last); Y = ds.train_y.cuda()
torch.manual_seed(0)
model = U.UNet(config).cuda().to(memory_format=torch.channels_last)
net = compile_net(model)
opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
t0 = time.time()
for i in range(steps):
    idx = torch.randint(0, len(X), (256,), device="cuda")
    with autocast(torch.device("cuda"), True):
        loss = diffusion_loss(net, X[idx], Y[idx], p_uncond=0.1, null_label=10)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if i % 500 == 0 or i == steps - 1:
        print(f"step {i} loss {loss.item():.4f} at {time.time() - t0:.0f} s", flush=True)
model.eval()
ref_model = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
ref_model.lambda_embed.register_forward_pre_hook(lambda m, a: (a[0].double(),))  # the sinusoids come as float32
qs = []
def hook(mod, args):
    x = args[0]; b = x.shape[0]; xg = x.reshape(b, mod.num_groups, -1)
    m, v = xg.mean(-1), xg.var(-1, unbiased=False); qs.append(((m * m + v) / (v + mod.eps)).flatten().float())
for mod in ref_model.modules():
    if isinstance(mod, U.GroupNorm): mod.register_forward_pre_hook(hook)
n = 1000
x0 = ds.test_x[:n].cuda(); y = ds.test_y[:n].cuda().clone(); y[::2] = 10  # half unconditional
gen = torch.Generator(device="cuda").manual_seed(1)
cases = []
for lam in torch.linspace(-15, 15, 7).tolist():
    lt = torch.full((n,), lam, device="cuda")
    a, s = torch.sigmoid(lt[:1]).sqrt(), torch.sigmoid(-lt[:1]).sqrt()
    z = (a * x0 + s * torch.randn(x0.shape, device="cuda", generator=gen)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = ref_model(z.double().contiguous(), lt.double(), y)
    cases.append((lam, z, lt, ref))
q = torch.cat(qs)
print("q quantiles (0.5, 0.99, 0.999, 1):", [f"{v:.1f}" for v in torch.quantile(q[torch.randperm(len(q), device=q.device)[:10_000_000]], torch.tensor([.5, .99, .999, 1.], device=q.device)).tolist()], "max", f"{q.max().item():.1f}")
def errs(fn):
    out = []
    for lam, z, lt, ref in cases:
        with torch.no_grad(), autocast(torch.device("cuda"), True):
            e = fn(z, lt, y).double()
        out.append(((e - ref).norm() / ref.norm()).item())
    return out
rows = {}
rows["eager bf16 (native GroupNorm)"] = errs(lambda z, l, y: model(z.contiguous(), l, y))
torch._dynamo.reset()
rows["compiled bf16, sums (this code)"] = errs(compile_net(model))
torch._dynamo.reset()
with P.welford_statistics():
    rows["compiled bf16, Welford"] = errs(compile_net(model))
print("relative L2 error of eps against float64 eager, by lambda", [c[0] for c in cases])
for k, v in rows.items():
    print(f"  {k:34s}", " ".join(f"{e:.2e}" for e in v))
