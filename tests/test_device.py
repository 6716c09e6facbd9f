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
