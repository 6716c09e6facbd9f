"""Guidance identities (Ho & Salimans Eq. 6) with a stub network."""

import pytest
import torch

from cfg.maths.guidance import (
    GUIDANCE,
    Step,
    guidance_scale_to_w,
    guided_denoiser,
    guided_eps,
    needed_passes,
    w_to_guidance_scale,
)

NULL = 5


def stub_model(z, lam, labels):
    # a per-example function whose conditional and unconditional outputs clearly differ
    shift = torch.where(labels == NULL, torch.full_like(lam, -0.7), labels.to(z.dtype) + 0.3)
    return torch.tanh(z) * (1 + lam[:, None, None, None] / 10) + shift[:, None, None, None]


def _inputs(b=6):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, 1, 4, 4, generator=g)
    lam = torch.randn(b, generator=g) * 5
    labels = torch.arange(b) % NULL
    return z, lam, labels


def test_w_zero_is_conditional():
    z, lam, labels = _inputs()
    out = guided_eps(stub_model, z, lam, labels, torch.zeros(6), NULL)
    torch.testing.assert_close(out, stub_model(z, lam, labels), rtol=0, atol=0)


def test_w_minus_one_is_unconditional():
    z, lam, labels = _inputs()
    out = guided_eps(stub_model, z, lam, labels, torch.full((6,), -1.0), NULL)
    torch.testing.assert_close(out, stub_model(z, lam, torch.full_like(labels, NULL)))


def test_eq6_for_positive_w():
    z, lam, labels = _inputs()
    w = 2.5
    expected = (1 + w) * stub_model(z, lam, labels) - w * stub_model(z, lam, torch.full_like(labels, NULL))
    torch.testing.assert_close(guided_eps(stub_model, z, lam, labels, torch.tensor(w), NULL), expected)


def test_mixed_w_batch_equals_separate_batches():
    z, lam, labels = _inputs()
    w = torch.tensor([-1.0, 0.0, 0.1, 0.5, 2.0, 4.0])
    mixed = guided_eps(stub_model, z, lam, labels, w, NULL)
    for i in range(6):
        single = guided_eps(stub_model, z[i : i + 1], lam[i : i + 1], labels[i : i + 1], w[i : i + 1], NULL)
        torch.testing.assert_close(mixed[i : i + 1], single)


def test_one_forward_pass_on_doubled_batch():
    calls = []

    def counting(z, lam, labels):
        calls.append(z.shape[0])
        return stub_model(z, lam, labels)

    z, lam, labels = _inputs()
    guided_eps(counting, z, lam, labels, torch.ones(6), NULL)
    assert calls == [12]


def test_skipped_passes_change_nothing_and_shrink_the_batch():
    # w = 0 rows need no unconditional pass, w = -1 rows no conditional pass; the result is that of both passes
    calls = []

    def counting(z, lam, labels):
        calls.append((z.shape[0], int((labels == NULL).sum())))
        return stub_model(z, lam, labels)

    z, lam, labels = _inputs()
    w = torch.tensor([-1.0, 0.0, 0.1, 0.0, -1.0, 4.0])
    full = guided_eps(stub_model, z, lam, labels, w, NULL)
    cond, uncond = needed_passes(w, 6)
    assert cond.tolist() == [1, 2, 3, 5] and uncond.tolist() == [0, 2, 4, 5]
    lean = guided_eps(counting, z, lam, labels, w, NULL, passes=(cond, uncond))
    torch.testing.assert_close(lean, full, rtol=0, atol=1e-6)
    assert calls == [(8, 4)]  # 4 conditional + 4 unconditional rows instead of 6 + 6

    calls.clear()
    denoised = guided_denoiser(counting, labels, w, NULL)(z, lam[0])
    torch.testing.assert_close(denoised, guided_eps(stub_model, z, lam[0].expand(6), labels, w, NULL))
    assert calls == [(8, 4)]


def test_skipped_passes_at_the_edges():
    # a scalar w covers every row; all rows at -1 or at 0 leave one pass with no rows at all
    z, lam, labels = _inputs()
    for w in (torch.tensor(0.3), torch.full((6,), -1.0), torch.zeros(6)):
        full = guided_eps(stub_model, z, lam, labels, w, NULL)
        lean = guided_eps(stub_model, z, lam, labels, w, NULL, passes=needed_passes(w, 6))
        torch.testing.assert_close(lean, full, rtol=0, atol=1e-6)
    assert [r.numel() for r in needed_passes(torch.tensor(0.3), 6)] == [6, 6]
    assert [r.numel() for r in needed_passes(torch.full((6,), -1.0), 6)] == [0, 6]
    with pytest.raises(ValueError, match=r"w must be a scalar or have shape \(6,\), got shape \(4,\)"):
        needed_passes(torch.zeros(4), 6)


def test_guidance_scale_conversion():
    assert w_to_guidance_scale(0.3) == 1.3
    assert guidance_scale_to_w(7.5) == 6.5
    assert guidance_scale_to_w(w_to_guidance_scale(-1.0)) == -1.0


# w = 0 is plain conditional sampling for these methods with their default options at every step (cfgpp renoises
# with ε(z), threshold thresholds x̂, cfg_zero_star zeroes its first step); w = −1 plain unconditional for cfg and
# autoguidance only: interval guides inside its interval only, schedule scales w by up to 2, rescale takes
# ε(z, c)'s std, apg projects on x̂_c, cfg_zero_star scales ε(z) by α*
CONDITIONAL_AT_W0 = ["cfg", "interval", "schedule", "autoguidance", "rescale", "apg"]
UNCONDITIONAL_AT_W_MINUS_1 = ["cfg", "autoguidance"]


def _eps_z_lam(b=4):
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u, z = (torch.randn(b, 1, 3, 3, generator=g) for _ in range(3))
    return eps_c, eps_u, z, torch.linspace(-5, 5, b)


@pytest.mark.parametrize("name", CONDITIONAL_AT_W0)
def test_guidance_methods_are_conditional_at_w0(name):
    eps_c, eps_u, z, lam = _eps_z_lam()
    for index in (0, 5, 9):
        out = GUIDANCE[name](eps_c, eps_u, torch.zeros(4, 1, 1, 1), z=z, lam=lam, step=Step(index, 10))
        torch.testing.assert_close(out, eps_c)


@pytest.mark.parametrize("name", UNCONDITIONAL_AT_W_MINUS_1)
def test_guidance_methods_are_unconditional_at_w_minus_1(name):
    eps_c, eps_u, z, lam = _eps_z_lam()
    for index in (0, 5, 9):
        out = GUIDANCE[name](eps_c, eps_u, -torch.ones(4, 1, 1, 1), z=z, lam=lam, step=Step(index, 10))
        torch.testing.assert_close(out, eps_u)
