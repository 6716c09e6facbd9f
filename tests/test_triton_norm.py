"""The Triton GroupNorm kernels (cfg.nets.triton_norm) against float64 torch, on the CPU through Triton's interpreter.

Triton's interpreter replaces its language's functions when Triton is imported with TRITON_INTERPRET=1, so the
kernel tests run in a pytest subprocess started with it (`test_kernels_in_the_interpreter`); in this process they
skip. On CUDA, tests/test_gpu.py compares the compiled sampling forward with and without them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_in_the_interpreter's subprocess")


@pytest.mark.skipif(INTERPRETED, reason="is the subprocess")
def test_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu", __file__],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    summary = out.stdout.splitlines()[-1]  # only this test skipped there
    assert re.search(r"\b1 skipped", summary) and "passed" in summary, out.stdout


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# (N, C, H, W): one tile of rows; C = 192 in a block of 256 channels (a quarter masked) with 6 channels a group over
# two row tiles, the last short; 40×40 rows over 25 tiles
SHAPES = [(3, 8, 5, 7), (2, 192, 5, 7), (2, 64, 40, 40)]


@kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm_keeps_a_small_spread_far_from_zero(shape):
    """Data at 100 ± 0.01 in float32: the variance 1e-4 lies below float32's resolution of a squared mean of 1e4, so
    moments from a one-pass Σx² would lose it and normalise to noise; the kernel's shifted sums keep it."""
    from cfg.nets.triton_norm import group_norm_act

    torch.manual_seed(0)
    x = channels_last(torch.randn(shape) * 0.01 + 100.0)
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    groups = c // 2 if c < 32 else 32
    y = group_norm_act(x, groups, w, b, 1e-12)
    ref = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-12)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)


@kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("pre_bias", [False, True])
def test_group_norm_act_equals_the_torch_composition(shape, film, silu, pre_bias):
    """silu(GroupNorm(x + β₀)·(1 + s) + t), every part on and off, against float64 torch: group counts as the U-Net
    uses them (gcd(32, C): 2 to 6 channels a group here), output channels-last in the asked dtype."""
    from cfg.nets.triton_norm import group_norm_act
    from cfg.nets.unet import _norm

    torch.manual_seed(1)
    n, c = shape[:2]
    x = channels_last(torch.randn(shape) * 1.5 + 0.7)
    norm = _norm(c)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    b0 = torch.randn(c) if pre_bias else None
    s, t = (torch.randn(n, c, 1, 1) * 0.5, torch.randn(n, c, 1, 1)) if film else (None, None)
    g = norm.num_groups

    ref = x.double() + (b0.double().view(-1, 1, 1) if pre_bias else 0)
    ref = F.group_norm(ref, g, norm.weight.double(), norm.bias.double(), norm.eps)
    if film:
        ref = ref * (1 + s.double()) + t.double()
    ref = F.silu(ref) if silu else ref
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        with torch.no_grad():
            y = group_norm_act(
                x, g, norm.weight, norm.bias, norm.eps, pre_bias=b0, scale=s, shift=t, silu=silu, dtype=dtype
            )
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@kernels
def test_group_norm_act_matches_the_u_nets_group_norm():
    """The fused function and cfg's GroupNorm module (its eager form) give the same values for the U-Net's calls."""
    from cfg.nets.triton_norm import group_norm_act
    from cfg.nets.unet import _norm

    torch.manual_seed(2)
    x = channels_last(torch.randn(2, 128, 6, 6))
    norm = _norm(128)
    s, t = torch.randn(2, 128, 1, 1), torch.randn(2, 128, 1, 1)
    with torch.no_grad():
        want = norm(x.contiguous(), scale=s, shift=t, silu=True)
        got = group_norm_act(
            x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale=s, shift=t, silu=True
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
