"""Schedule, forward process and label dropout against exact answers."""

import math

import pytest
import torch
from scipy import stats

from cfg.maths.diffusion import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    alpha_sigma,
    drop_labels,
    lambda_from_u,
    q_sample,
    sample_training_lambda,
    sampling_lambdas,
    u_from_lambda,
)


def test_schedule_endpoints_and_support():
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = lambda_from_u(u)
    assert lam[0].item() == pytest.approx(LAMBDA_MAX, abs=1e-9)
    assert lam[-1].item() == pytest.approx(LAMBDA_MIN, abs=1e-9)
    assert bool((lam[1:] < lam[:-1]).all()), "λ must fall as u rises"
    drawn = sample_training_lambda(100_000, generator=torch.Generator().manual_seed(0))
    assert drawn.min() >= LAMBDA_MIN - 1e-4 and drawn.max() <= LAMBDA_MAX + 1e-4


def test_u_from_lambda_inverts_schedule():
    u = torch.rand(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(u_from_lambda(lambda_from_u(u)), u, atol=1e-10, rtol=0)
    lam = torch.linspace(-15, 15, 301, dtype=torch.float64)
    torch.testing.assert_close(lambda_from_u(u_from_lambda(lam)), lam, atol=1e-8, rtol=0)


def test_schedule_matches_closed_form_at_midpoint():
    # symmetric endpoints: b = arctan(e^-10), a = π/2 − 2b, so u = 1/2 gives tan(π/4) = 1 and λ = 0
    assert lambda_from_u(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    # λ(u) for other endpoints against the formula written out by hand
    u = torch.tensor([0.3], dtype=torch.float64)
    b = math.atan(math.exp(-5 / 2))
    a = math.atan(math.exp(10 / 2)) - b
    assert lambda_from_u(u, -10, 5).item() == pytest.approx(-2 * math.log(math.tan(a * 0.3 + b)), rel=1e-12)


def test_training_lambda_distribution_is_uniform_in_u():
    lam = sample_training_lambda(50_000, generator=torch.Generator().manual_seed(2)).double()
    u = u_from_lambda(lam).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_alpha_sigma_variance_preserving():
    lam = torch.linspace(-20, 20, 401, dtype=torch.float64)
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), lam, atol=1e-6, rtol=1e-9)


def test_q_sample_moments():
    gen = torch.Generator().manual_seed(3)
    x = torch.full((200_000, 1), 2.0)
    lam = torch.full((200_000,), 0.5)
    z = q_sample(x, lam, torch.randn(x.shape, generator=gen))
    alpha, sigma = alpha_sigma(torch.tensor(0.5))
    assert z.mean().item() == pytest.approx(2 * alpha.item(), abs=0.01)
    assert z.std().item() == pytest.approx(sigma.item(), abs=0.01)


def test_sampling_lambdas_increase_between_endpoints():
    lam = sampling_lambdas(17)
    assert lam.shape == (17,)
    assert bool((lam[1:] > lam[:-1]).all())
    assert lam[0].item() == pytest.approx(LAMBDA_MIN) and lam[-1].item() == pytest.approx(LAMBDA_MAX)
    torch.testing.assert_close(
        u_from_lambda(lam), torch.linspace(1, 0, 17, dtype=torch.float64), atol=1e-10, rtol=0
    )
    with pytest.raises(ValueError, match="steps"):
        sampling_lambdas(1)


@pytest.mark.parametrize("p_uncond", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_label_dropout_fraction(p_uncond):
    n, null = 200_000, 10
    labels = torch.arange(n) % 10
    out = drop_labels(labels, p_uncond, null, generator=torch.Generator().manual_seed(4))
    frac = (out == null).double().mean().item()
    sd = math.sqrt(p_uncond * (1 - p_uncond) / n)
    assert abs(frac - p_uncond) <= 5 * sd + 1e-12
    kept = out != null
    assert bool((out[kept] == labels[kept]).all()), "labels that are kept must be unchanged"


def test_label_dropout_rejects_bad_probability():
    with pytest.raises(ValueError, match="1.5"):
        drop_labels(torch.zeros(3, dtype=torch.long), 1.5, 10)
