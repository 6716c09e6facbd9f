"""U-Net shapes and conditioning, EMA, checkpoints and a short real training run on digits."""

import re
import shutil

import pytest
import torch

from cfg.data.datasets import load_dataset
from cfg.engine.training import train_diffusion
from cfg.nets.unet import EMA, UNet, UNetConfig, load_checkpoint, save_checkpoint

TINY = UNetConfig(
    image_size=8,
    in_channels=1,
    num_classes=10,
    base_width=16,
    channel_mult=(1, 2),
    attention_resolutions=(4,),
    dropout=0.0,
    head_channels=16,
)


def _perturbed(model):
    # the output convolution starts at zero (ADM): give it weights so that outputs depend on inputs
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_unet_shapes_and_conditioning():
    model = _perturbed(UNet(TINY))
    z = torch.randn(4, 1, 8, 8)
    lam = torch.tensor([-5.0, 0.0, 5.0, 10.0])
    out = model(z, lam, torch.tensor([0, 1, 2, 10]))
    assert out.shape == z.shape
    other = model(z, lam, torch.tensor([3, 1, 2, 10]))
    assert not torch.allclose(out[0], other[0]), "the class label must change the output"
    torch.testing.assert_close(out[1:], other[1:])
    assert not torch.allclose(model(z, lam + 3, torch.tensor([0, 1, 2, 10])), out), "λ must change the output"


def test_null_label_is_an_extra_embedding_row():
    model = UNet(TINY)
    assert model.class_embed.num_embeddings == TINY.num_classes + 1
    assert TINY.null_label == 10


def test_bad_resolution_is_rejected():
    with pytest.raises(ValueError, match="image_size 10"):
        UNetConfig(image_size=10, channel_mult=(1, 2, 2))


def test_ema_update_rule():
    model = UNet(TINY)
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    for p in model.parameters():
        p.data.add_(1.0)
    ema.update(model)
    for b, p_ema, p in zip(before, ema.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.9 * b + 0.1 * p)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_warmup_follows_its_formula_then_the_configured_decay():
    # one scalar weight set to a new value before each update: the EMA must follow the recursion exactly
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.99, warmup=True)
    assert [ema.decay_at(t) for t in (0, 1, 10)] == [1 / 10, 2 / 11, 11 / 20]
    assert ema.decay_at(890) == ema.decay_at(5000) == 0.99  # (1 + t) / (10 + t) reaches 0.99 at t = 890
    expected = model.weight.detach().clone().double()
    torch.manual_seed(0)
    for t in range(1000):
        model.weight.data.normal_()
        d = min(0.99, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model.weight.detach().double()
        ema.update(model)
    assert ema.num_updates == 1000
    torch.testing.assert_close(ema.model.weight.double(), expected, rtol=1e-5, atol=1e-6)
    # the update count is part of the state, so a resumed EMA continues the schedule
    other = EMA(model, decay=0.99, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1000


def test_warmed_up_ema_is_close_to_the_trained_weights_after_a_few_hundred_steps():
    # a toy regression whose weights travel far from their initialisation in 300 Adam steps
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    init = torch.cat([p.detach().flatten() for p in model.parameters()])
    x = torch.randn(512, 16)
    y = x @ (torch.randn(16, 4) * 2) + 1.0
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    warm, plain = EMA(model, 0.999, warmup=True), EMA(model, 0.999)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        warm.update(model)
        plain.update(model)

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    trained = flat(model)
    travel = (trained - init).norm()
    assert travel > 5, "the toy weights must move"
    # 0.999**300 = 0.74: without warm-up the average still holds three quarters of the initial weights
    assert (flat(plain.model) - trained).norm() / travel > 0.6
    assert (flat(warm.model) - trained).norm() / travel < 0.02


def test_checkpoint_roundtrip(tmp_path):
    model = _perturbed(UNet(TINY))
    save_checkpoint(tmp_path / "ckpt.pt", model, {"p_uncond": 0.2})
    loaded, meta = load_checkpoint(tmp_path / "ckpt.pt")
    assert meta == {"p_uncond": 0.2}
    assert loaded.config == TINY
    z, lam, c = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([1, 10])
    torch.testing.assert_close(loaded(z, lam, c), model(z, lam, c))


def test_training_lowers_the_loss_on_digits():
    ds = load_dataset("digits", image_size=8)
    result = train_diffusion(
        TINY,
        ds.train_x,
        ds.train_y,
        p_uncond=0.2,
        steps=300,
        batch_size=64,
        lr=2e-3,
        warmup_steps=20,
        ema_decay=0.99,
        seed=0,
        log_every=50,
    )
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6
    # ε-prediction starts at the zero output (loss ≈ E‖ε‖² = 1) and must fall well below it
    assert losses[0] > 0.5
    assert losses[-1] < 0.75 * losses[0], losses
    assert result.images_per_s > 0


def test_ema_apply_with_a_tensor_decay_equals_update():
    # the CUDA-graph path's EMA (decay a tensor, no Python number) against update's lerp
    from cfg.nets.unet import EMA

    torch.manual_seed(0)
    model = UNet(
        UNetConfig(image_size=8, base_width=8, channel_mult=(1,), attention_resolutions=(), head_channels=8)
    )
    a, b = EMA(model, 0.99, warmup=True), EMA(model, 0.99, warmup=True)
    for _ in range(5):
        for p in model.parameters():
            p.data.add_(torch.randn_like(p))
        decay = torch.tensor(b.decay_at(b.num_updates))
        a.update(model)
        b.apply_(model, decay)
        b.num_updates += 1
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_unet_is_the_same_function_in_either_memory_format():
    """The attention block splits heads with views of whichever layout it gets (NCHW on the CPU, NHWC on the GPU):
    the same outputs and gradients from both, since the weights' meaning must not depend on the layout."""
    torch.manual_seed(0)
    config = UNetConfig(
        image_size=16, base_width=32, channel_mult=(1, 2), attention_resolutions=(16, 8), dropout=0.0
    )
    model = UNet(config)
    for p in model.parameters():
        p.data.add_(
            0.05 * torch.randn_like(p)
        )  # away from the zero init, which would hide the attention output
    x = torch.randn(3, 1, 16, 16)
    lam, y = torch.randn(3), torch.tensor([0, 4, 10])
    out, grads = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        model.to(memory_format=fmt)
        o = model(x.contiguous(memory_format=fmt), lam, y)
        o.square().sum().backward()
        out.append(o)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.allclose(
        out[0], out[1], rtol=1e-5, atol=1e-5
    )  # float32: the kernels' summation orders differ
    scale = max(g.abs().max() for g in grads[1])  # some biases ahead of a GroupNorm get ~0 gradient: absolute
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6 * scale)


def conv_weight_recorder(weights: list):
    """A torch.compile backend (AOTAutograd's graphs, run uncompiled) that appends the weight shape of every
    convolution in the forward graphs to `weights`."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.convolution.default:
                weights.append(tuple(node.args[1].meta["val"].shape))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))


def test_unet_traced_with_the_cuda_conv_forms_is_the_eager_function(monkeypatch):
    """The whole U-Net under torch.compile (AOTAutograd's graphs, run uncompiled) on channels-last with CUDA's
    convolution forms given to the CPU (channel padding to 8, tap_conv for at most 4 output channels): the stem
    padded, the last convolution as tap_conv's 1×1 convolution to 16 maps; outputs and every gradient equal the
    eager network's."""
    import cfg.nets.unet as unet

    monkeypatch.setattr(unet, "_TAP_CHANNELS", {"cpu": 4})
    monkeypatch.setattr(unet, "_CHANNEL_MULTIPLE", {"cpu": 8})
    torch._dynamo.reset()
    weights = []
    torch.manual_seed(0)
    config = UNetConfig(
        image_size=8, base_width=16, channel_mult=(1, 2), attention_resolutions=(4,), dropout=0.0
    )
    model = UNet(config).to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # away from the zero init of the output convolution
    x = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    lam, y = torch.randn(3), torch.tensor([0, 4, 10])
    out, grads = [], []
    for net in (torch.compile(model, backend=conv_weight_recorder(weights)), model):
        model.zero_grad()
        o = net(x, lam, y)
        o.square().sum().backward()
        out.append(o.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert (16, 8, 3, 3) in weights and (16, 16, 1, 1) in weights  # the stem padded; the output by taps
    assert (1, 16, 3, 3) not in weights and (8, 16, 3, 3) not in weights
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in grads[1])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6 * scale)


def graph_recorder(traced: list):
    """A torch.compile backend that appends each traced graph's code to `traced` and runs the graph uncompiled."""

    def spy(gm, example_inputs):
        traced.append(gm.code)
        return gm.forward

    return spy


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="Inductor on the CPU needs a C++ compiler",
)
def test_group_norm_compiled_on_channels_last_equals_the_native_op():
    """Under torch.compile a channels-last GroupNorm takes its statistics from per-channel moments combined per
    group (the graph holds var_mean, not group_norm): its output and every gradient equal the float64 native op's,
    for activations of unit scale and for ones whose variance is below eps, where eps's place shows. The same with
    the residual blocks' modulation GN(x) · (1 + scale) + shift, which that form folds into its per-channel affine:
    the gradients of scale and shift too, per example and channel and per channel (broadcast over the batch). And
    the compiled form returns the unfolded product's dtype when the input and the modulation differ in dtype."""
    from cfg.nets.unet import GroupNorm

    traced = []
    spy = graph_recorder(traced)

    torch.manual_seed(0)
    norm = GroupNorm(8, 32)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    films = [
        None,
        (0.5 * torch.randn(4, 32, 1, 1), torch.randn(4, 32, 1, 1)),  # per example and channel
        (0.5 * torch.randn(1, 32, 1, 1), torch.randn(1, 32, 1, 1)),  # per channel
    ]
    for x in (
        3 * torch.randn(4, 32, 6, 6) + 1,
        1e-3 * torch.randn(4, 32, 6, 6),
    ):  # variance 9 / 1e-6 (eps 1e-5)
        x = x.contiguous(memory_format=torch.channels_last)
        for film in films:
            modulated = film is not None
            film = film or (torch.zeros(()), torch.zeros(()))
            ref = x.double().requires_grad_()
            w, b = (t.detach().double().requires_grad_() for t in (norm.weight, norm.bias))
            s, t = (f.double().requires_grad_() for f in film)
            out = torch.nn.functional.group_norm(ref, 8, w, b, norm.eps)
            if modulated:
                out = out * (1 + s) + t
            up = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
            (out * up).sum().backward()
            expected = [out, ref.grad, w.grad, b.grad] + ([s.grad, t.grad] if modulated else [])
            for fn in (torch.compile(norm), torch.compile(norm, backend=spy)):
                norm.zero_grad()
                xi = x.clone().requires_grad_()
                si, ti = (f.clone().requires_grad_() for f in film)
                got = fn(xi, si, ti) if modulated else fn(xi)
                (got * up.float()).sum().backward()
                grads = [got, xi.grad, norm.weight.grad, norm.bias.grad] + (
                    [si.grad, ti.grad] if modulated else []
                )
                for e, g in zip(expected, grads, strict=True):
                    assert torch.allclose(g.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
    assert traced and all("var_mean" in code and "group_norm" not in code for code in traced)
    x = torch.randn(4, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    for x_dtype, film_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        xd, sd, td = x.to(x_dtype), films[1][0].to(film_dtype), films[1][1].to(film_dtype)
        eager = norm(xd.contiguous(), sd, td)  # the native op and the unfolded product
        with torch.no_grad():
            got = torch.compile(norm)(xd, sd, td)
        assert got.dtype == eager.dtype == torch.float32
        assert torch.allclose(
            got, eager.detach(), rtol=2e-2, atol=2e-2 * eager.abs().max().item()
        )  # bf16 inputs


def test_channel_moments_take_sums_only_for_low_precision_inputs_without_gradients():
    """GroupNorm's per-channel moments: a bf16/fp16 batch that no gradient flows through takes them from float32
    sums of x and x² (no var_mean in the traced graph), within the rounding bounds of n sequential additions
    (n = H · W) of the float64 moments of the same values: the mean within n · 2⁻²⁴ · E|x|, the variance within
    3n · 2⁻²⁴ · (mean² + var), at means up to 30 standard deviations from zero, eagerly and through a graph-recording
    backend. float32 inputs and inputs that need a gradient keep var_mean's Welford reduction, within 1e-5 of the
    variance for channels whose mean² is 10⁶ times their variance or more, where the sums keep almost no digit."""
    from cfg.nets.unet import _channel_moments

    traced = []
    spy = graph_recorder(traced)

    def recorded(x):
        torch._dynamo.reset()  # traced afresh for every input, not found in Dynamo's cache
        traced.clear()
        out = torch.compile(_channel_moments, backend=spy, fullgraph=True)(x)
        assert len(traced) == 1
        return out

    torch.manual_seed(0)
    shape = (8, 16, 32, 32)
    n = shape[2] * shape[3]
    for dtype in (torch.bfloat16, torch.float16):
        for offset in (0.0, 3.0, 30.0):
            x = (torch.randn(shape) + offset).to(dtype).contiguous(memory_format=torch.channels_last)
            x64 = x.double()
            exact_var, exact_mean = torch.var_mean(x64, dim=(2, 3), correction=0)
            for fn in (_channel_moments, recorded):
                mean, var = fn(x)
                assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == shape[:2]
                bound = 3 * n * 2**-24 * (exact_mean**2 + exact_var)
                assert ((var.double() - exact_var).abs() <= bound).all(), (dtype, offset)
                mean_bound = n * 2**-24 * x64.abs().mean(dim=(2, 3))
                assert ((mean.double() - exact_mean).abs() <= mean_bound).all(), (dtype, offset)
                if fn is recorded:
                    assert "var_mean" not in traced[0] and "mean" in traced[0]

    near = torch.randn(shape, dtype=torch.float64) * 0.01 + 10.0  # mean² 10⁶ times the variance
    for x in (near.float(), near.to(torch.bfloat16).requires_grad_()):  # bf16: a few values 1/16 apart
        exact_var = torch.var(x.detach().double(), dim=(2, 3), unbiased=False)
        for fn in (_channel_moments, recorded):
            _, var = fn(x)
            assert torch.allclose(var.detach().double(), exact_var, rtol=1e-5, atol=0), x.dtype
            if fn is recorded:
                assert "var_mean" in traced[0]


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="Inductor on the CPU needs a C++ compiler",
)
def test_channel_moments_from_sums_are_never_negative():
    """Channels constant but for one pixel have a variance near 0 that the sums' rounding can make negative (through
    Inductor, whose CPU code sums one element after another, 487 of these 1,024 channels did): the variance comes out
    ≥ 0, and within 3n · 2⁻²⁴ · (mean² + var) of the float64 one."""
    from cfg.nets.unet import _channel_moments

    torch.manual_seed(0)
    n = 32 * 32
    # constant channels (5 to 25) with one pixel two bf16 steps up: variance ~4e-6 against a mean² up to 625
    base = (torch.rand(16, 64, 1, 1) * 20 + 5).to(torch.bfloat16)
    flat = base.expand(16, 64, 32, 32).reshape(16, 64, -1).clone()
    step = torch.finfo(torch.bfloat16).eps * base.float().view(16, 64, 1)
    flat.scatter_(
        2, torch.randint(0, n, (16, 64, 1)), (base.float().view(16, 64, 1) + 2 * step).to(torch.bfloat16)
    )
    x = flat.view(16, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch._dynamo.reset()  # compiled afresh, not found in Dynamo's cache
    _, var = torch.compile(_channel_moments)(x)
    assert (var >= 0).all()
    assert ((var.double() - exact_var).abs() <= 3 * n * 2**-24 * (exact_mean**2 + exact_var)).all()


def test_group_norm_refuses_a_modulation_it_cannot_fold():
    """scale and shift come together, each one value per example and channel (or per channel): the eager product
    would broadcast other shapes (per pixel, or a (B, C) matrix against H × W), which the compiled fold cannot."""
    from cfg.nets.unet import GroupNorm

    norm, x = GroupNorm(2, 4), torch.randn(2, 4, 3, 3)
    per_example = torch.zeros(2, 4, 1, 1)
    with pytest.raises(ValueError, match="got scale without shift"):
        norm(x, per_example)
    with pytest.raises(ValueError, match="got shift without scale"):
        norm(x, shift=per_example)
    for bad in (torch.zeros(2, 4, 3, 3), torch.zeros(3, 3), torch.zeros(2, 4), torch.zeros(3, 4, 1, 1), 0.5):
        shape = tuple(bad.shape) if isinstance(bad, torch.Tensor) else "float"
        with pytest.raises(ValueError, match=re.escape(f"scale of shape {shape}")):
            norm(x, bad, per_example)
        with pytest.raises(ValueError, match=re.escape(f"shift of shape {shape}")):
            norm(x, per_example, bad)


def _upsample_case(compile_fn):
    """Upsample's output and input gradient through `compile_fn` on a channels-last input, against the native
    nearest upsampling in float64 (a weighted sum of the output, so that each gradient entry sums 4 distinct
    weights)."""
    from cfg.nets.unet import Upsample

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    ref = x.double().requires_grad_()
    out = torch.nn.functional.interpolate(ref, scale_factor=2, mode="nearest")
    up = torch.randn(out.shape, dtype=torch.float64)
    (out * up).sum().backward()
    xi = x.clone().requires_grad_()
    got = compile_fn(Upsample())(xi)
    (got * up.float()).sum().backward()
    assert got.shape == (2, 6, 10, 6) and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, out.detach().float())  # copies of the input: exact
    assert torch.allclose(xi.grad.double(), ref.grad, rtol=1e-6, atol=1e-6)


def test_upsample_traced_on_channels_last_repeats_pixels_without_a_scatter():
    """Under torch.compile Upsample repeats each pixel through a broadcast view (the traced graph holds expand, not
    interpolate, whose backward Inductor makes an atomic scatter-add): the native op's output, exactly, and its
    gradient. Dynamo traces; the graph runs uncompiled (no C++ compiler needed)."""
    traced = []
    spy = graph_recorder(traced)

    _upsample_case(lambda m: torch.compile(m, backend=spy))
    assert traced and all("expand" in code and "interpolate" not in code for code in traced)
    # eager and contiguous inputs keep the native op
    from cfg.nets.unet import Upsample

    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(Upsample()(x), torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="Inductor on the CPU needs a C++ compiler",
)
def test_upsample_compiled_by_inductor_equals_the_native_op():
    _upsample_case(torch.compile)


@pytest.mark.parametrize(
    ("c_in", "c_out", "multiple", "conv_in", "conv_out"),
    [
        (4, 6, None, 4, 6),  # no multiple for the device: as it is
        (1, 16, 8, 8, 16),
        (16, 1, 8, 16, 8),
        (3, 5, 8, 8, 8),
        (9, 17, 8, 16, 24),
        (8, 16, 8, 8, 16),  # already multiples: as it is
    ],
)
def test_conv_traced_on_channels_last_hands_back_channels_last_gradients(
    monkeypatch, c_in, c_out, multiple, conv_in, conv_out
):
    """cfg's Conv2d under torch.compile (AOTAutograd's graphs, run uncompiled): the backward graph clones the
    convolution's output gradient channels-last, and the output and every gradient equal the eager nn.Conv2d's.
    With a channel multiple set for the device (here the CPU; cuDNN's is 8 on CUDA), the traced convolution runs
    on channel counts rounded up to that multiple (the forward graph pads with zeros only then), and still every
    value equals the unpadded one's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import cfg.nets.unet as unet
    from cfg.nets.unet import Conv2d

    monkeypatch.setattr(unet, "_CHANNEL_MULTIPLE", {"cpu": multiple} if multiple else {})
    graphs = {"fw": [], "bw": []}
    conv_weights = []  # (out, in) channels of each convolution the forward graph runs

    def keeper(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm.code)
            if kind == "fw":
                for node in gm.graph.nodes:
                    if node.target is torch.ops.aten.convolution.default:
                        conv_weights.append(tuple(node.args[1].meta["val"].shape[:2]))
            return make_boxed_func(gm.forward)

        return compiler

    torch.manual_seed(0)
    conv = Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, c_in, 5, 5).contiguous(memory_format=torch.channels_last)
    up = torch.randn(2, c_out, 5, 5)
    results = []
    for fn in (
        torch.compile(conv, backend=aot_autograd(fw_compiler=keeper("fw"), bw_compiler=keeper("bw"))),
        plain,
    ):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * up).sum().backward()
        m = conv if fn is not plain else plain
        results.append([out.detach(), xi.grad, m.weight.grad, m.bias.grad])
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert graphs["bw"] and all("channels_last" in code for code in graphs["bw"])
    padded = (conv_in, conv_out) != (c_in, c_out)
    assert graphs["fw"] and all(("constant_pad_nd" in code) == padded for code in graphs["fw"])
    assert conv_weights == [(conv_out, conv_in)] * len(graphs["fw"])
    assert isinstance(conv, torch.nn.Conv2d) and set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "padding"),
    [
        (1, 16, 3, (1, 1)),  # the stem's shape (which Conv2d leaves to the convolution)
        (3, 8, 3, (1, 1)),
        (16, 1, 3, (1, 1)),  # the output convolution's
        (8, 3, 5, (2, 2)),
        (4, 6, 3, (0, 0)),  # "valid": a smaller output
        (6, 2, 3, (2, 0)),  # unequal padding, larger than the kernel's half
        (2, 2, 1, (0, 0)),
        (1, 1, 3, (1, 1)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_tap_conv_equals_conv2d_in_float64(c_in, c_out, k, padding, bias):
    """tap_conv (a 1×1 convolution to one map per tap and output channel, then the maps shifted and summed) against
    F.conv2d in float64, for few and many channels either way: output and the gradients of input, weight and bias,
    and the input's layout kept."""
    from cfg.nets.unet import tap_conv

    torch.manual_seed(0)
    x = torch.randn(2, c_in, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64) if bias else None
    grads = []
    for fn in (tap_conv, lambda *a: torch.nn.functional.conv2d(*a[:3], padding=a[3])):
        leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if bias else None, padding)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    assert grads[0][0].is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(*grads, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("c_in", "c_out", "conv_weights"),
    [
        (16, 1, [(16, 16, 1, 1)]),  # the output convolution: 9 taps, padded to 16 maps
        (16, 3, [(32, 16, 1, 1)]),  # 27 maps, padded to 32
        (1, 16, [(16, 1, 3, 3)]),  # few inputs (the stem): the convolution itself
        (16, 5, [(5, 16, 3, 3)]),  # more outputs than _TAP_CHANNELS
    ],
)
def test_conv_traced_on_channels_last_sums_taps_for_few_outputs(monkeypatch, c_in, c_out, conv_weights):
    """cfg's Conv2d under torch.compile (AOTAutograd's graphs, run uncompiled) on a device in _TAP_CHANNELS (here
    the CPU, at most 4 output channels; CUDA's in the package): a convolution with at most that many output channels
    and more inputs is traced as tap_conv's 1×1 convolution to one map per tap, any other as itself; a channels-last
    output, and output and every gradient equal the eager nn.Conv2d's."""
    import cfg.nets.unet as unet
    from cfg.nets.unet import Conv2d

    monkeypatch.setattr(unet, "_TAP_CHANNELS", {"cpu": 4})
    monkeypatch.setattr(unet, "_CHANNEL_MULTIPLE", {})
    torch._dynamo.reset()  # Conv2d.forward compiled afresh, not beyond Dynamo's recompile limit after other tests'
    traced = []

    torch.manual_seed(0)
    conv = Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, c_in, 5, 5).contiguous(memory_format=torch.channels_last)
    up = torch.randn(2, c_out, 5, 5)
    results = []
    for m, fn in ((conv, torch.compile(conv, backend=conv_weight_recorder(traced))), (plain, plain)):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * up).sum().backward()
        results.append([out.detach(), xi.grad, m.weight.grad, m.bias.grad])
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(*results, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert traced == conv_weights


@pytest.mark.parametrize(
    ("tokens", "grad", "layout", "direct"),
    [
        (64, False, "channels_last", True),  # sampling at 8 x 8: the memory-efficient op itself
        (65, False, "channels_last", False),  # beyond EFFICIENT_ATTENTION_TOKENS
        (64, True, "channels_last", False),  # gradients: SDPA's pick (efficient slowed the training step)
        (64, False, "nchw", False),  # channels strided: the op refuses them
        (64, False, "unaligned", False),  # strides of 5 (heads) and 60 (tokens) elements: not multiples of 8
        (64, False, "float64", False),  # a dtype the kernels do not take
    ],
)
def test_attention_takes_the_efficient_op_only_where_its_rule_says(monkeypatch, tokens, grad, layout, direct):
    """cfg's `attention` routing, on meta tensors with the rule extended to the meta device (CUDA's kernels are
    checked against float64 attention in tests/test_gpu.py): which aten ops ran, the output's shape, and the graph
    Dynamo traces of it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cfg.nets import unet

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(unet, "EFFICIENT_ATTENTION_TOKENS", {"meta": 64})
    d = 4 if layout == "unaligned" else 8
    if layout == "nchw":  # the contiguous block's views of (B, 3, heads, d, tokens)
        qkv = torch.empty(2, 3, 4, d, tokens, device="meta", requires_grad=grad)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))
    else:  # the channels-last block's views of (B, tokens, 3, heads, d)
        dtype = torch.float64 if layout == "float64" else torch.float32
        qkv = torch.empty(
            2, tokens, 3, 4, d + (layout == "unaligned"), device="meta", dtype=dtype, requires_grad=grad
        )
        q, k, v = (t[..., :d].transpose(1, 2) for t in qkv.unbind(2))
    with torch.set_grad_enabled(grad), Ops() as ops:
        out = unet.attention(q, k, v)
    assert ("_scaled_dot_product_efficient_attention.default" in ops.names) == direct
    assert out.shape == (2, 4, tokens, d)

    # under torch.compile: one graph (no break on the rule's checks) that holds the op where the rule says
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(unet.attention, backend=backend, fullgraph=True)(q, k, v)
    traced = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("_scaled_dot_product_efficient_attention" in t for t in traced) == direct


def test_the_capability_query_is_marked_constant_as_torchs_decorator_marks_it_without_importing_dynamo():
    """cfg.nets.unet marks `_bf16_efficient_kernels` for Dynamo by hand: the decorator would import torch._dynamo
    in every stage process. The mark must be what torch.compiler.assume_constant_result sets, and importing the
    module must leave torch._dynamo unimported."""
    import subprocess
    import sys

    from cfg.nets import unet

    def probe() -> bool:
        return True

    torch.compiler.assume_constant_result(probe)
    marks = dict(vars(probe))
    assert marks and all(getattr(unet._bf16_efficient_kernels, k, None) == v for k, v in marks.items()), marks
    code = "import sys, cfg.nets.unet; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "importing cfg.nets.unet imported torch._dynamo"
