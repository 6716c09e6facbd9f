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
    assert set(COMPILE_MODES) == {"default", "coordinate-descent", "max-autotune"}
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
