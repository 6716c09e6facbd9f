"""cfg.engine.device: what a `train.compile` / `sample.compile` setting hands torch.compile (checked on the compiler
configuration torch.compile keeps, so on CPU and without compiling anything)."""

import pytest
import torch

from cfg.engine.device import COMPILE_MODES, COMPILE_OPTIONS, compile_as


def test_false_leaves_the_network_as_it_is():
    net = torch.nn.Linear(2, 2)
    assert compile_as(net, False) is net


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (True, {"coordinate_descent_tuning": False, "max_autotune": False}),
        ("default", {"coordinate_descent_tuning": False, "max_autotune": False}),
        ("coordinate-descent", {"coordinate_descent_tuning": True, "max_autotune": False}),
        ("max-autotune", {"coordinate_descent_tuning": True, "max_autotune": True}),
    ],
)
def test_each_setting_compiles_with_its_options_and_the_forced_layout(setting, expected):
    net = torch.nn.Linear(2, 2)
    compiled = compile_as(net, setting)
    assert compiled is not net and compiled._orig_mod is net
    config = compiled.get_compiler_config()
    assert {k: config[k] for k in expected} == expected
    assert all(config[k] == v for k, v in COMPILE_OPTIONS.items())  # channels-last forced in every variant
    assert config["triton.cudagraphs"] is False  # train.cuda_graph captures its own step


def test_every_named_variant_is_a_setting_and_an_unknown_one_is_refused_naming_the_accepted():
    assert set(COMPILE_MODES) == {"default", "coordinate-descent", "max-autotune", "regional"}
    with pytest.raises(
        ValueError, match=r"'fast' is not one of true, false, \['default', 'coordinate-descent'"
    ):
        compile_as(torch.nn.Linear(2, 2), "fast")


@pytest.mark.parametrize("setting", [False, True])
def test_sampling_sets_cudnn_autotuning_for_its_loop_only(setting):
    """`sample.cudnn_benchmark` holds while generate_w_grid samples and the flag is back as it was after it (the
    FID curve samples inside a training run that autotunes)."""
    from cfg.engine.generate import generate_w_grid
    from cfg.nets.unet import UNet, UNetConfig

    net = UNet(
        UNetConfig(image_size=8, base_width=8, channel_mult=(1,), head_channels=8, num_classes=3)
    ).eval()
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not setting
    inside = []
    try:
        generate_w_grid(
            net, [0.0], 3, num_classes=3, image_shape=(1, 8, 8), steps=2, batch_size=1,
            use_cudnn_benchmark=setting, progress=lambda i: inside.append(torch.backends.cudnn.benchmark),
        )  # fmt: skip
        # after: as it was, but on a CUDA host generate_w_grid's configure_cuda has turned autotuning on first
        assert inside == [setting] * 3
        assert torch.backends.cudnn.benchmark is (torch.cuda.is_available() or not setting)
    finally:
        torch.backends.cudnn.benchmark = before


def _tiny_unet():
    """13 blocks of 3 kinds (8→8 and 16→8 residual, attention at 8×8), its weights moved off their initialisation
    (the output and each block's last convolution start at zero, which would leave most gradients zero)."""
    from cfg.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(
        image_size=8, base_width=8, channel_mult=(1,), blocks_per_level=2, attention_resolutions=(8,),
        head_channels=8, num_classes=3, dropout=0.0,
    )  # fmt: skip
    net = UNet(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _limits():
    config = torch._dynamo.config
    return config.recompile_limit, config.accumulated_recompile_limit


def _restore(limits):
    torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


def test_regional_compiles_every_block_in_place_with_the_settings_options_and_room_to_recompile():
    """ "regional": each residual and attention block compiled on its own (the network object itself returned, its
    state dict's keys unchanged, the layers between blocks left eager), with the forced channels-last layout, and
    Dynamo's recompile limits raised for REGION_GRAPHS graphs a block, never lowered."""
    from cfg.engine.device import REGION_GRAPHS
    from cfg.nets.unet import AttentionBlock, ResBlock

    net = _tiny_unet()
    keys = list(net.state_dict())
    blocks = [m for m in net.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    limits = _limits()
    try:
        torch._dynamo.config.recompile_limit = 10_000  # a higher limit is kept
        assert compile_as(net, "regional") is net
        assert list(net.state_dict()) == keys
        assert len(blocks) == 13 and all(b._compiled_call_impl is not None for b in blocks)
        others = [m for m in net.modules() if not isinstance(m, (ResBlock, AttentionBlock))]
        assert all(m._compiled_call_impl is None for m in others)
        for block in blocks:
            config = block._compiled_call_impl.get_compiler_config()
            assert all(config[k] == v for k, v in COMPILE_OPTIONS.items())
            assert config["coordinate_descent_tuning"] is False  # "default"'s options
        assert _limits() == (10_000, max(limits[1], REGION_GRAPHS * 13))
    finally:
        _restore(limits)


def test_regional_refuses_a_network_without_blocks_to_compile_naming_the_whole_graph_setting():
    with pytest.raises(ValueError, match=r"Linear names no blocks to compile.*compile: true"):
        compile_as(torch.nn.Linear(2, 2), "regional")


@pytest.mark.slow
def test_regional_compilation_matches_eager_and_compiles_each_distinct_block_once():
    """On CPU's Inductor: the regionally compiled U-Net's output and every parameter's gradient equal the eager
    network's (float reassociation), and its 13 blocks of 3 kinds compile 3 graphs, not 13."""
    from torch._dynamo.utils import counters

    eager = _tiny_unet()
    net = _tiny_unet()
    z, lam, labels = torch.randn(4, 1, 8, 8), torch.linspace(-5, 5, 4), torch.tensor([0, 1, 2, 3])
    torch._dynamo.reset()
    counters.clear()
    limits = _limits()
    try:
        compile_as(net, "regional")
        outs = []
        for model in (eager, net):
            out = model(z, lam, labels)
            (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
            outs.append([out, *(p.grad for p in model.parameters())])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        _restore(limits)
    # nothing trivially zero: the output and every parameter's gradient
    assert all(t.abs().max() > 0 for t in outs[0])
    for e, g in zip(*outs, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))
    assert graphs == 3
