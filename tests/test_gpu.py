"""CUDA paths: the same numbers as on the CPU where they must agree, finite bf16 sampling, and throughput."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity

from cfg.data.datasets import load_dataset
from cfg.engine.generate import generate_w_grid
from cfg.engine.training import train_diffusion
from cfg.maths.diffusion import sampling_lambdas
from cfg.maths.guidance import guided_eps, needed_passes
from cfg.maths.noise import example_noise
from cfg.maths.samplers import SAMPLERS
from cfg.nets.unet import UNet, UNetConfig

from .analytic import GaussianMixtureEps
from .test_samplers import MIX_COVS, MIX_MEANS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CONFIG = UNetConfig(
    image_size=8, base_width=16, channel_mult=(1, 2), attention_resolutions=(4,), head_channels=16
)


@pytest.fixture
def full_fp32():
    """float32 convolutions and matmuls in full precision for one test, restored after it: cuDNN's default TF32
    rounds a float32 convolution to ~1e-3 relative, and two forms of one computation (eager and compiled, another
    batch) then differ by that much. (Once only the first test set this, for good, and a test run alone failed.)"""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:  # (monkeypatch cannot: the matmul settings are no attributes it could restore)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def test_guided_eps_matches_cpu_in_fp32(full_fp32):
    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    z, lam = torch.randn(16, 1, 8, 8), torch.linspace(-10, 10, 16)
    labels, w = torch.arange(16) % 10, torch.linspace(-1, 4, 16)
    with torch.no_grad():
        cpu = guided_eps(model, z, lam, labels, w, 10)
        gpu = guided_eps(model.cuda(), z.cuda(), lam.cuda(), labels.cuda(), w.cuda(), 10).cpu()
    assert (gpu - cpu).norm() / cpu.norm() < 1e-4


def test_skipped_passes_under_compile_match_both_passes(full_fp32):
    # rows at w = 0 / -1 run one pass; under torch.compile the smaller batch gives the same ε̃
    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    for p in model.parameters():  # the output layer starts at zero: give ε some size
        p.data.add_(torch.randn_like(p) * 0.05)
    model = model.cuda()
    z, lam = torch.randn(16, 1, 8, 8, device="cuda"), torch.linspace(-10, 10, 16, device="cuda")
    labels = torch.arange(16, device="cuda") % 10
    w = torch.tensor([-1.0, 0.0, 0.3, 4.0], device="cuda").repeat(4)
    compiled = torch.compile(model)
    with torch.no_grad():
        both = guided_eps(model, z, lam, labels, w, 10)
        lean = guided_eps(compiled, z, lam, labels, w, 10, passes=needed_passes(w, 16))
    assert (lean - both).norm() / both.norm() < 1e-3


def test_noise_streams_on_cuda_are_the_cpus():
    """The per-example streams are integer hashes and a float64 Box-Muller: a CUDA process draws the CPU's noise
    (to rounding of log and cos), so a cell's samples do not depend on the device that drew their noise."""
    ids = torch.tensor([0, 7, 123_456, 2**31 + 5, 2**40 + 1])
    for seed, step in ((11, 0), (11, 3), (2**33 + 1, 64)):
        cpu = example_noise(seed, ids, step, (1, 32, 32), dtype=torch.float64)
        gpu = example_noise(seed, ids.cuda(), step, (1, 32, 32), dtype=torch.float64)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)


def test_analytic_sampler_on_cuda_matches_cpu():
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    z = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.ones(2000, dtype=torch.long)

    def denoise(x, lam):  # the analytic model runs on the CPU; the sampler arithmetic on the GPU
        lam_b = lam.expand(x.shape[0]).cpu()
        return guided_eps(model, x.cpu(), lam_b, labels, torch.tensor(0.0, dtype=x.dtype), 2).to(x.device)

    ddim = SAMPLERS["ddim"]
    cpu = ddim(denoise, z, sampling_lambdas(64))
    gpu = ddim(denoise, z.cuda(), sampling_lambdas(64)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)


def test_bf16_training_and_sampling_on_cuda():
    ds = load_dataset("digits", image_size=8)
    result = train_diffusion(
        CONFIG,
        ds.train_x,
        ds.train_y,
        p_uncond=0.2,
        steps=300,
        batch_size=128,
        lr=2e-3,
        warmup_steps=20,
        seed=0,
        device="cuda",
        bf16=True,
        log_every=50,
    )
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.75 * losses[0]
    images, labels = generate_w_grid(
        result.ema,
        [-1.0, 0.0, 2.0],
        64,
        num_classes=10,
        image_shape=(1, 8, 8),
        steps=16,
        sampler_options={"clip_denoised": 1.0},
        device="cuda",
        bf16=True,
    )
    assert images.shape == (3, 64, 1, 8, 8) and images.dtype == torch.uint8
    assert images.float().std() > 10, "samples must not collapse to a constant"


def assert_same_updates(a: torch.nn.Module, b: torch.nn.Module, config: UNetConfig, seed: int = 0) -> None:
    """Two training runs took the same steps: per tensor, b's total update (final − initial weights) differs from
    a's by at most 1% of (its own norm + the norm a tensor of its size gets at the run's root-mean-square update).
    Rounding (cuDNN's autotuned algorithms, Inductor's kernels, the graph's EMA and Adam kernels) drifts ~1e-4 in a
    weight after 40 Adam steps, which an element-wise atol of 1e-4 failed 1 run in ~4 on an H100; and a conv bias
    ahead of a GroupNorm gets ~0 gradient, so its update is Adam-amplified rounding (per-tensor-relative alone
    failed 4 runs in 4). A stale buffer, a wrong learning rate or a missed step changes the updates by their size."""
    torch.manual_seed(seed)  # train_diffusion seeds, then builds the U-Net: its initial weights
    init = UNet(config).state_dict()
    deltas = [
        (name, p.float().cpu() - init[name], q.float().cpu() - init[name])
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True)
    ]
    rms = (sum(da.square().sum() for _, da, _ in deltas) / sum(da.numel() for _, da, _ in deltas)).sqrt()
    for name, da, db in deltas:
        assert (db - da).norm() <= 1e-2 * (da.norm() + rms * da.numel() ** 0.5), name


@pytest.mark.parametrize(
    "compiled, compile_update",
    [(False, False), (True, False), (True, True)],
    ids=["eager_net", "compiled_net", "compiled_net_and_update"],
)
def test_cuda_graph_training_matches_the_eager_step(compiled, compile_update, full_fp32):
    """train.cuda_graph: the same draws, the step replayed as one graph; weights, EMA and loss curve equal the
    eager step's up to rounding (fp32 autocast off; train_diffusion turns TF32 matmuls on for both paths, and
    EMA's d·a + (1 − d)·b and Adam's capturable kernel round differently). With train.compile_update the graph's
    clipping, Adam (foreach) and EMA run as Inductor's kernels."""
    ds = load_dataset("digits", image_size=8)
    config = UNetConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    kw = dict(p_uncond=0.2, steps=40, batch_size=64, lr=1e-3, warmup_steps=10, seed=0, device="cuda")
    kw |= dict(bf16=False, log_every=10, ema_decay=0.9, compile=compiled)
    eager = train_diffusion(config, ds.train_x, ds.train_y, **kw)
    graph = train_diffusion(
        config, ds.train_x, ds.train_y, cuda_graph=True, compile_update=compile_update, **kw
    )
    assert_same_updates(eager.model, graph.model, config)
    assert_same_updates(eager.ema, graph.ema, config)
    assert [h["loss"] for h in graph.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-3)


def test_cuda_graph_training_resumed_mid_warm_up_matches_an_uninterrupted_run(tmp_path):
    """A resume state is loaded onto the CPU; the learning rate must go back to the GPU before the capture, or
    fused Adam reads it once and the graph keeps a warm-up learning rate for the rest of the run."""

    class Stop(Exception):
        pass

    def stop_at(step):
        def callback(entry):
            if entry["step"] == step:
                raise Stop

        return callback

    ds = load_dataset("digits", image_size=8)
    config = UNetConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    kw = dict(p_uncond=0.2, steps=60, batch_size=64, lr=1e-3, warmup_steps=50, seed=0, device="cuda")
    kw |= dict(bf16=False, log_every=10, ema_decay=0.9, cuda_graph=True)
    whole = train_diffusion(config, ds.train_x, ds.train_y, **kw)
    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train_diffusion(
            config, ds.train_x, ds.train_y, **kw, resume_path=state, checkpoint_every=10, callback=stop_at(20)
        )
    resumed = train_diffusion(config, ds.train_x, ds.train_y, **kw, resume_path=state, checkpoint_every=10)
    assert resumed.resumed_from == 10
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in whole.history])
    assert_same_updates(whole.model, resumed.model, config)


def test_cuda_graph_training_with_mid_run_sampling_of_the_ema_matches_the_eager_step():
    """The train stage's FID curve samples the EMA weights mid-run (generate_w_grid converts its model to
    channels-last). The EMA must keep its storage, which the captured step updates in place: a contiguous EMA
    was reallocated there, the replays went on writing freed memory and the final EMA was garbage (FID 1,377
    against 18.6 eager on the Fashion-MNIST preset, one H200)."""
    ds = load_dataset("digits", image_size=8)
    config = UNetConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    kw = dict(p_uncond=0.2, steps=40, batch_size=64, lr=1e-3, warmup_steps=10, seed=0, device="cuda")
    kw |= dict(bf16=False, log_every=10, ema_decay=0.9)

    def sample_ema(entry):
        generate_w_grid(
            entry["ema"], [0.0, 1.0], 8, num_classes=10, image_shape=(1, 8, 8), steps=4, device="cuda"
        )

    eager = train_diffusion(config, ds.train_x, ds.train_y, callback=sample_ema, **kw)
    graph = train_diffusion(config, ds.train_x, ds.train_y, callback=sample_ema, cuda_graph=True, **kw)
    assert_same_updates(eager.model, graph.model, config)
    assert_same_updates(eager.ema, graph.ema, config)


def test_cuda_graph_training_refuses_to_replay_after_its_tensors_were_reallocated():
    ds = load_dataset("digits", image_size=8)
    kw = dict(p_uncond=0.2, steps=40, batch_size=64, warmup_steps=10, seed=0, device="cuda", log_every=10)

    def reallocate(entry):
        entry["ema"].to(memory_format=torch.contiguous_format)  # new storage for every 4-D weight

    with pytest.raises(RuntimeError, match="reallocated"):
        train_diffusion(CONFIG, ds.train_x, ds.train_y, callback=reallocate, cuda_graph=True, **kw)


CLAIM_W, CLAIM_N = [-1.0, 0.0, 0.5, 2.0], 203  # batches of 16 examples (64 rows): 12 full, a short one of 11


def _claim_cell(examples, device: str):
    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = CLAIM_N if examples is None else 0
    progress = getattr(examples, "progress", None)
    return generate_w_grid(
        model.to(device), CLAIM_W, n, examples=examples, num_classes=10, image_shape=(1, 8, 8), steps=16, seed=3,
        batch_size=64, device=device, bf16=True, progress=progress, use_cudnn_benchmark=False,
    )  # fmt: skip


def _claim_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    import time

    import torch.distributed as dist

    from cfg.engine.distributed import Claims, finish, gather_rows, init

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )  # fmt: skip
    d, device = init("cuda")
    dist.barrier()
    claims = Claims(CLAIM_N, d, 16)
    claims.progress = (lambda info: time.sleep(0.2)) if rank == 1 else None  # a GPU that also trains a model
    images, _ = _claim_cell(claims, str(device))
    taken = [None] * world
    dist.all_gather_object(taken, claims.rows().tolist())
    images = gather_rows(images, d, CLAIM_N, dim=1, rows=claims.rows())
    if d.main:
        torch.save({"images": images, "taken": taken}, out)
    finish(d)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_claiming_a_cells_batches_give_the_bytes_of_one(tmp_path):
    """NCCL and torchrun's store on real GPUs: two processes (cuda:0, cuda:1) claim a cell's batches, the one on
    cuda:1 slowed, and gather the very bytes one process samples on cuda:0 (bf16 autocast, eager), with cuDNN's
    algorithms chosen by its heuristics (`sample.cudnn_benchmark: false`). With autotuning on, one process on
    cuda:0 and one on cuda:1 differed in 5 of 51,968 bytes of this cell on two H200s; with it off in none."""
    import socket

    import torch.multiprocessing as mp

    from cfg.engine.distributed import Dist, shard

    one, _ = _claim_cell(None, "cuda:0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_claim_worker, args=(2, port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    fast, slow = two["taken"]
    assert sorted(fast + slow) == list(range(CLAIM_N))
    assert len(slow) < len(shard(CLAIM_N, Dist(1, 2), 16)) < len(fast)
    assert torch.equal(one, two["images"])


def _nccl_resume_worker(rank: int, world: int, port: int, state: str, out: str) -> None:
    """Twelve steps with dropout 0.5 on cuda:<rank> under NCCL, the resume state written at steps 5 and 10 (between
    the logs at 4, 8 and 12), then the same call again, continuing from step 10; every Dropout's zeroed elements
    in the first call, per rank."""
    import os

    import torch.distributed as dist

    from cfg.engine.distributed import finish, init

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )  # fmt: skip
    d, device = init("cuda")
    ds = load_dataset("digits", image_size=8)
    config = UNetConfig(**{**CONFIG.to_dict(), "dropout": 0.5})
    kw = dict(p_uncond=0.2, steps=12, batch_size=64, lr=1e-3, warmup_steps=4, seed=0, device=device, dist=d)
    kw |= dict(bf16=False, log_every=4, ema_decay=0.9, resume_path=state, checkpoint_every=5)
    masks = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Dropout) and module.training:
            masks.append(((output == 0) & (inputs[0] != 0)).cpu())

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    whole = train_diffusion(config, ds.train_x, ds.train_y, **kw)
    hook.remove()
    dist.barrier()  # rank 0's state is out before any rank reads it
    resumed = train_diffusion(config, ds.train_x, ds.train_y, **kw)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, masks)
    if d.main:
        torch.save(
            {
                "masks": per_rank,
                "runs": [
                    {
                        "model": r.model.cpu().state_dict(),
                        "history": [(h["step"], h["loss"]) for h in r.history],
                        "resumed_from": r.resumed_from,
                    }
                    for r in (whole, resumed)
                ],
            },
            out,
        )
    finish(d)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_with_their_own_dropout_masks_and_resume_between_logs(tmp_path):
    """The data-parallel training path on real GPUs (NCCL, DDP, CUDA's generators): each rank draws its own dropout
    masks (seeded alike, the ranks once shared them), and a resume state written between two logs continues the
    weights and the logged loss of the uninterrupted run (every rank's loss sum travels in the state)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state, out = tmp_path / "state.pt", tmp_path / "out.pt"
    mp.spawn(_nccl_resume_worker, args=(2, port, str(state), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    first, second = result["masks"]
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert a.shape == b.shape and a.any()
        assert (a == b).float().mean().item() < 0.75  # independent masks of p = 0.5 agree on about half
    whole, resumed = result["runs"]
    assert (whole["resumed_from"], resumed["resumed_from"]) == (0, 10)
    assert [s for s, _ in resumed["history"]] == [4, 8, 12]
    losses = [loss for _, loss in whole["history"]]
    assert [loss for _, loss in resumed["history"]] == pytest.approx(losses, rel=1e-4)
    config = UNetConfig(**{**CONFIG.to_dict(), "dropout": 0.5})
    nets = [UNet(config) for _ in range(2)]
    for net, run in zip(nets, (whole, resumed), strict=True):
        net.load_state_dict(run["model"])
    assert_same_updates(*nets, config)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 10 and saved["running"].shape == (2,)


def _compiled_conv_equals_the_plain_conv(c_in: int, c_out: int, check_code):
    """cfg's 3×3 Conv2d (c_in → c_out, channels-last) compiled by Inductor on CUDA against nn.Conv2d with the same
    weights (fp32, TF32 off: the calling tests take full_fp32): `check_code(code, out)` on the forward's generated
    code and output, then output and gradients equal. Returns the module, its compiled form and the input."""
    from torch._inductor.utils import run_and_get_code

    from cfg.nets.unet import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(c_in, c_out, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(c_in, c_out, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(8, c_in, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    up = torch.randn(8, c_out, 16, 16, device="cuda")
    compiled = torch.compile(conv)
    results = []
    for m in (conv, plain):
        xi = x.clone().requires_grad_()
        if m is conv:
            out, code = run_and_get_code(compiled, xi)
            check_code(code[0], out)
        else:
            out = m(xi)
        (out * up).sum().backward()
        results.append([out.detach(), xi.grad, m.weight.grad, m.bias.grad])
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    return conv, compiled, x


@pytest.mark.parametrize(("c_in", "c_out"), [(1, 16), (16, 5)])
def test_compiled_conv_padded_to_cudnn_channels_equals_the_plain_conv(c_in, c_out, full_fp32):
    """cfg's Conv2d compiled by Inductor on CUDA pads a one-channel input and five output channels (more than
    tap_conv takes) to 8 channels of zeros: the generated code pads and convolves 8 channels, and its output and
    gradients equal nn.Conv2d's (fp32, TF32 off) with the requested channel count. tests/test_model.py checks the
    traced graph's padding on the CPU."""

    def padded(code, out):
        # the 8-channel convolution's output (five output channels padded), or its weight (one input channel)
        shape = (8, 8, 16, 16) if c_out == 5 else (16, 8, 3, 3)
        assert "aten.constant_pad_nd" in code and f"({', '.join(map(str, shape))})" in code

    _compiled_conv_equals_the_plain_conv(c_in, c_out, padded)


@pytest.mark.parametrize(("c_in", "c_out"), [(64, 1), (16, 3)])
def test_compiled_few_output_conv_sums_taps_and_equals_the_plain_conv(c_in, c_out, full_fp32):
    """cfg's Conv2d compiled by Inductor on CUDA with at most _TAP_CHANNELS output channels: tap_conv's 1×1
    convolution to one map per tap (9 · C_out maps padded to a multiple of 8) in the generated code, a channels-last
    output, and output and gradients equal to nn.Conv2d's in float32 (TF32 off); under bf16 autocast a bf16 output
    within what bf16 rounding allows of the float64 convolution: the input, weights, maps and output each rounded
    once, at most 2⁻⁷ of the convolution of |x| with |w| plus |b|."""

    def by_taps(code, out):
        n = 9 * c_out + -9 * c_out % 8
        assert f"({n}, {c_in}, 1, 1)" in code
        assert out.is_contiguous(memory_format=torch.channels_last)

    conv, compiled, x = _compiled_conv_equals_the_plain_conv(c_in, c_out, by_taps)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    xd, wd, bd = (t.detach().double() for t in (x, conv.weight, conv.bias))
    exact = torch.nn.functional.conv2d(xd, wd, bd, padding=1)
    scale = torch.nn.functional.conv2d(xd.abs(), wd.abs(), bd.abs(), padding=1)
    assert ((out.double() - exact).abs() <= 2**-7 * scale + 1e-6).all()


@pytest.mark.parametrize("tokens", [16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_equals_softmax_attention_in_float64(tokens, dtype):
    """cfg's `attention` on CUDA, on q, k, v laid out as AttentionBlock makes them (views of one (B, tokens, 3,
    heads, d) tensor): without gradients up to EFFICIENT_ATTENTION_TOKENS tokens through the memory-efficient
    kernel, otherwise through F.scaled_dot_product_attention; outputs and input gradients equal
    softmax(q kᵀ / √d) v computed in float64."""
    from cfg.nets.unet import EFFICIENT_ATTENTION_TOKENS, attention

    torch.manual_seed(0)
    qkv = torch.randn(6, tokens, 3, 4, 32, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(6, 4, tokens, 32, device="cuda", dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    outs = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            outs[grad] = attention(q, k, v)
        names = {e.name for e in prof.events()}
        # SDPA's public op (whatever kernel it then picks) unless no gradient is needed and the sequence is short
        direct = not grad and tokens <= EFFICIENT_ATTENTION_TOKENS["cuda"]
        assert ("aten::scaled_dot_product_attention" in names) == (not direct)
        assert ("aten::_scaled_dot_product_efficient_attention" in names) >= direct
    (outs[True] * up).sum().backward()

    ref_in = qkv.detach().double().requires_grad_()
    rq, rk, rv = (t.transpose(1, 2) for t in ref_in.unbind(2))
    ref = torch.softmax(rq @ rk.transpose(-1, -2) / 32**0.5, dim=-1) @ rv
    (ref * up.double()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((outs[False], ref), (outs[True], ref), (qkv.grad, ref_in.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < tol, (tokens, dtype, err.item())


def test_compiled_channels_last_network_takes_the_efficient_attention_and_equals_sdpa(monkeypatch):
    """The sampling path as the stages run it (channels-last, bf16 autocast, compile_net, no gradients): Inductor's
    code calls the memory-efficient op for the 16-token blocks of CONFIG, and ε equals the eager network's with
    every attention through SDPA (EFFICIENT_ATTENTION_TOKENS emptied)."""
    from torch._inductor.utils import run_and_get_code

    from cfg.engine.device import compile_net
    from cfg.nets import unet

    torch.manual_seed(0)
    model = UNet(CONFIG).eval()
    for p in model.parameters():  # the output layer starts at zero: give ε some size
        p.data.add_(torch.randn_like(p) * 0.05)
    model = model.cuda().to(memory_format=torch.channels_last)
    z = torch.randn(16, 1, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    lam, labels = torch.linspace(-10, 10, 16, device="cuda"), torch.arange(16, device="cuda") % 10
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, code = run_and_get_code(compile_net(model), z, lam, labels)
        monkeypatch.setattr(unet, "EFFICIENT_ATTENTION_TOKENS", {})
        ref = model(z, lam, labels)
    assert "_scaled_dot_product_efficient_attention" in "\n".join(code)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2


@pytest.mark.parametrize("size", [8, 16])  # 64 tokens: the memory-efficient op; 256: SDPA's pick
@pytest.mark.parametrize("grad", [False, True])
def test_compiled_attention_block_reads_q_k_v_as_views_of_one_matmul(size, grad):
    """Compiled channels-last under bf16 autocast (sampling without gradients, the training forward with them), the
    attention op's q, k and v are views of one buffer, the output of the qkv matmul with its bias (addmm): no kernel
    copies them out with a bias added in between (Inductor's code for a 1×1 convolution did). The block's output
    and input gradient equal the eager block's on the contiguous layout, whose q, k, v come from the convolution."""
    import re

    from torch._inductor.utils import run_and_get_code

    from cfg.engine.device import compile_net
    from cfg.nets.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(128, 32).cuda()
    for p in block.parameters():  # the projection starts at zero: give the attention's output some size
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(12, 128, size, size, device="cuda", requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = block(x)
        compiled = compile_net(copy.deepcopy(block).to(memory_format=torch.channels_last))
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(grad)
        out, code = run_and_get_code(compiled, x_cl)
    code = "\n".join(code)
    calls = re.findall(r"(_scaled_dot_product_\w+)\.default\((.*)\)", code)
    forward = [args for op, args in calls if not op.endswith("_backward")]
    assert forward, "no attention op in the compiled code"
    for call in forward:
        sources = re.findall(r"reinterpret_tensor\((buf\d+)", call.split(", None")[0])
        assert len(sources) == 3 and len(set(sources)) == 1, call
        # ... and that buffer is what the matmul wrote (with its bias: addmm), not a Triton kernel's copy
        assert re.search(rf"extern_kernels\.addmm\(.*\bout={sources[0]}\)", code), sources[0]
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2
    if grad:
        (g_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
        (g_out,) = torch.autograd.grad(out.float().square().sum(), x_cl)
        assert (g_out - g_ref).norm() / g_ref.norm() < 5e-2
