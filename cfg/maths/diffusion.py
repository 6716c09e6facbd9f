"""Continuous-time variance-preserving diffusion in log-SNR λ, as in Ho & Salimans (2022), Sec. 2.

z_λ = α_λ x + σ_λ ε with α²_λ = sigmoid(λ) and σ²_λ = sigmoid(−λ), so α² + σ² = 1 and λ = log(α²/σ²).
Training draws λ = −2 log tan(a·u + b), u ~ U[0, 1], which maps u = 0 to λ_max (clean) and u = 1 to λ_min (noisy).
The same map at uniformly spaced u gives the sampling schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LAMBDA_MIN = -20.0  # log-SNR at the noisy end (paper's λ_min)
LAMBDA_MAX = 20.0  # log-SNR at the clean end (paper's λ_max)


def alpha_sigma(lam: Tensor) -> tuple[Tensor, Tensor]:
    """α_λ and σ_λ of the VP process: α² = sigmoid(λ), σ² = sigmoid(−λ)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def _schedule_ab(lambda_min: float, lambda_max: float) -> tuple[float, float]:
    # b = arctan(e^(−λmax/2)), a = arctan(e^(−λmin/2)) − b (paper, Sec. 2)
    if not lambda_min < lambda_max:
        raise ValueError(f"lambda_min must be < lambda_max, got {lambda_min} and {lambda_max}")
    b = math.atan(math.exp(-lambda_max / 2))
    a = math.atan(math.exp(-lambda_min / 2)) - b
    return a, b


def lambda_from_u(u: Tensor, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX) -> Tensor:
    """λ = −2 log tan(a·u + b): the paper's cosine-derived log-SNR schedule, u ∈ [0, 1]."""
    a, b = _schedule_ab(lambda_min, lambda_max)
    # float64: near u = 1 the tangent is ~e^10 and float32 loses the last digits of λ
    lam = -2 * torch.log(torch.tan(a * u.double() + b))
    return lam.to(u.dtype) if u.is_floating_point() else lam.float()


def u_from_lambda(lam: Tensor, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX) -> Tensor:
    """Inverse of `lambda_from_u`: u = (arctan(e^(−λ/2)) − b) / a."""
    a, b = _schedule_ab(lambda_min, lambda_max)
    u = (torch.atan(torch.exp(-lam.double() / 2)) - b) / a
    return u.to(lam.dtype)


def sample_training_lambda(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    lambda_min: float = LAMBDA_MIN,
    lambda_max: float = LAMBDA_MAX,
) -> Tensor:
    """n training log-SNRs λ = −2 log tan(a·u + b) with u ~ U[0, 1]; (n,) float32."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return lambda_from_u(u, lambda_min, lambda_max).float()


def sampling_lambdas(
    steps: int,
    *,
    lambda_min: float = LAMBDA_MIN,
    lambda_max: float = LAMBDA_MAX,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The T log-SNRs of the sampling schedule at uniformly spaced u from 1 to 0: λ_1 = λ_min < … < λ_T = λ_max."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the schedule needs both endpoints), got {steps}")
    u = torch.linspace(1.0, 0.0, steps, dtype=torch.float64, device=device)
    return lambda_from_u(u, lambda_min, lambda_max).to(dtype)


def q_sample(x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
    """z_λ = α_λ x + σ_λ ε, with λ of shape (B,) broadcast over the image dimensions."""
    alpha, sigma = alpha_sigma(lam.view(-1, *([1] * (x.dim() - 1))))
    return alpha * x + sigma * eps


def drop_labels(
    labels: Tensor, p_uncond: float, null_label: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by `null_label` independently with probability p_uncond (joint training, Alg. 1)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(
    model: torch.nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    p_uncond: float,
    null_label: int,
    generator: torch.Generator | None = None,
    lambda_min: float = LAMBDA_MIN,
    lambda_max: float = LAMBDA_MAX,
    rows: slice | None = None,  # the batch rows this process computes (data parallel); None = all
) -> Tensor:
    """ε-prediction MSE of Alg. 1: ‖ε_θ(z_λ, c) − ε‖² with c dropped to the null label w.p. p_uncond.

    λ, ε and the label drops are drawn for the whole batch x in every process, and the loss is taken over
    `rows` only: data-parallel processes then see exactly the draws a single process would."""
    lam, eps, c = training_draws(
        x, labels, p_uncond=p_uncond, null_label=null_label, generator=generator,
        lambda_min=lambda_min, lambda_max=lambda_max,
    )  # fmt: skip
    if rows is not None:
        x, lam, eps, c = x[rows], lam[rows], eps[rows], c[rows]
    return eps_loss(model, x, lam, eps, c)


def training_draws(
    x: Tensor,
    labels: Tensor,
    *,
    p_uncond: float,
    null_label: int,
    generator: torch.Generator | None = None,
    lambda_min: float = LAMBDA_MIN,
    lambda_max: float = LAMBDA_MAX,
) -> tuple[Tensor, Tensor, Tensor]:
    """The random part of `diffusion_loss` for a batch x, in its order: λ, ε and the labels after dropout."""
    lam = sample_training_lambda(
        x.shape[0], generator=generator, device=x.device, lambda_min=lambda_min, lambda_max=lambda_max
    )
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return lam, eps, drop_labels(labels, p_uncond, null_label, generator=generator)


def eps_loss(model: torch.nn.Module, x: Tensor, lam: Tensor, eps: Tensor, c: Tensor) -> Tensor:
    """The deterministic part of `diffusion_loss`: ‖ε_θ(α_λ x + σ_λ ε, λ, c) − ε‖² averaged."""
    eps_hat = model(q_sample(x, lam, eps), lam, c)
    return F.mse_loss(eps_hat.float(), eps)
