"""Samplers as pure functions: no files, no logging, randomness only from the passed noise source.

Every sampler has the signature ``sampler(denoise, z, lambdas, *, noise=None, callback=None, **options)``:
    denoise    (z, λ) -> ε̃, e.g. `cfg.maths.guidance.guided_denoiser` (λ a scalar tensor)
    z          initial noise at λ_1 = lambdas[0], (B, C, H, W)
    lambdas    increasing log-SNRs λ_1 < … < λ_T (`cfg.maths.diffusion.sampling_lambdas`)
    noise      step t -> standard normal noise shaped like z, the only source of randomness
               (`cfg.maths.noise.stream_source`: per-example streams; None: torch.randn_like)
    callback   optional callback(step, total_steps, z, x_hat) for progress
and returns x̂ at λ_T, the last step's data prediction (Ho & Salimans 2022, Alg. 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cfg.maths.diffusion import alpha_sigma
from cfg.maths.guidance import Denoiser
from cfg.maths.noise import NoiseSource
from cfg.registry import Registry

Callback = Callable[[int, int, Tensor, Tensor], None]

# name -> sampler; its options are its keyword-only arguments (e.g. the ancestral sampler's v) less those the
# engine passes to every sampler
SAMPLERS: Registry[Callable[..., Tensor]] = Registry(
    "sampler", reserved=("noise", "clip_denoised", "callback")
)


def _x_hat(z: Tensor, eps: Tensor, lam: Tensor, clip_denoised: float | None) -> Tensor:
    # x̂ = (z − σ_λ ε̃) / α_λ (Alg. 2, line 4), optionally clipped to the data range
    alpha, sigma = alpha_sigma(lam)
    x = (z - sigma.to(z.dtype) * eps) / alpha.to(z.dtype)
    return x.clamp(-clip_denoised, clip_denoised) if clip_denoised is not None else x


def _check_lambdas(lambdas: Tensor) -> None:
    if lambdas.dim() != 1 or lambdas.numel() < 2:
        raise ValueError(f"lambdas must be a 1-D schedule of >= 2 log-SNRs, got shape {tuple(lambdas.shape)}")
    if not bool((lambdas[1:] > lambdas[:-1]).all()):
        raise ValueError("lambdas must increase strictly (noisy -> clean)")


@SAMPLERS.register("ancestral", bounds={"v": (0.0, 1.0)})
@torch.no_grad()
def sample_ancestral(
    denoise: Denoiser,
    z: Tensor,
    lambdas: Tensor,
    *,
    noise: NoiseSource | None = None,
    v: float = 0.3,  # interpolation of the reverse variance between σ̃² (v = 0) and σ² (v = 1)
    clip_denoised: float | None = None,  # clip x̂ to [−c, c] at every step; None for unbounded data
    callback: Callback | None = None,
) -> Tensor:
    """The paper's ancestral sampler (Alg. 2): z' ~ N(μ̃_{λ'|λ}(z, x̂), (σ̃²_{λ'|λ})^(1−v) (σ²_{λ|λ'})^v).

    With r = e^(λ−λ'): μ̃ = r (α_λ'/α_λ) z + (1 − r) α_λ' x̂, σ̃² = (1 − r) σ²_λ', σ²_{λ|λ'} = (1 − r) σ²_λ.
    """
    _check_lambdas(lambdas)
    noise = noise or (lambda t: torch.randn_like(z))
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        x_hat = _x_hat(z, denoise(z, lam), lam, clip_denoised)
        if i == total - 1:
            if callback is not None:
                callback(i, total, z, x_hat)
            break
        lam_next = lambdas[i + 1]
        alpha, sigma = alpha_sigma(lam)
        alpha_n, sigma_n = alpha_sigma(lam_next)
        one_minus_r = -torch.expm1(lam - lam_next)  # 1 − e^(λ−λ'), exact for close λ
        r = 1 - one_minus_r
        mean = (r * alpha_n / alpha).to(z.dtype) * z + (one_minus_r * alpha_n).to(z.dtype) * x_hat
        var = (one_minus_r * sigma_n**2) ** (1 - v) * (one_minus_r * sigma**2) ** v
        z = mean + var.sqrt().to(z.dtype) * noise(i).to(z.dtype)
        if callback is not None:
            callback(i, total, z, x_hat)
    return x_hat


@SAMPLERS.register("ddim")
@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    z: Tensor,
    lambdas: Tensor,
    *,
    noise: NoiseSource | None = None,  # unused: DDIM is deterministic given z
    clip_denoised: float | None = None,  # clip x̂ to [−c, c] at every step; None for unbounded data
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, η = 0) on the same λ schedule: z' = α_λ' x̂ + σ_λ' ε̂."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        eps = denoise(z, lam)
        x_hat = _x_hat(z, eps, lam, clip_denoised)
        if i < total - 1:
            alpha, sigma = alpha_sigma(lam)
            if clip_denoised is not None:  # keep ε consistent with the clipped x̂
                eps = (z - alpha.to(z.dtype) * x_hat) / sigma.to(z.dtype)
            alpha_n, sigma_n = alpha_sigma(lambdas[i + 1])
            z = alpha_n.to(z.dtype) * x_hat + sigma_n.to(z.dtype) * eps
        if callback is not None:
            callback(i, total, z, x_hat)
    return x_hat


@SAMPLERS.register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    z: Tensor,
    lambdas: Tensor,
    *,
    noise: NoiseSource | None = None,  # unused: the solver is deterministic given z
    clip_denoised: float | None = None,  # clip x̂ to [−c, c] at every step; None for unbounded data
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2): the multistep second-order solver of the
    probability-flow ODE in data prediction, on the half log-SNR h = (λ' − λ)/2 of our λ = log(α²/σ²):

        z' = (σ_λ'/σ_λ) z − α_λ' (e^(−h) − 1) D,   D = (1 + 1/(2r)) x̂_λ − 1/(2r) x̂_prev,  r = h_prev / h,

    with D = x̂_λ on the first step (which is then DDIM). As k-diffusion's `sample_dpmpp_2m`."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_prev, h_prev = None, None
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        x_hat = _x_hat(z, denoise(z, lam), lam, clip_denoised)
        if i < total - 1:
            lam_next = lambdas[i + 1]
            h = (lam_next - lam) / 2
            _, sigma = alpha_sigma(lam)
            alpha_n, sigma_n = alpha_sigma(lam_next)
            d = x_hat
            if x_prev is not None:
                c = (h / (2 * h_prev)).to(z.dtype)  # 1 / (2r)
                d = (1 + c) * x_hat - c * x_prev
            z = (sigma_n / sigma).to(z.dtype) * z - (alpha_n * torch.expm1(-h)).to(z.dtype) * d
            x_prev, h_prev = x_hat, h
        if callback is not None:
            callback(i, total, z, x_hat)
    return x_hat


@SAMPLERS.register("heun")
@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    z: Tensor,
    lambdas: Tensor,
    *,
    noise: NoiseSource | None = None,  # unused: deterministic (EDM's S_churn = 0)
    clip_denoised: float | None = None,  # clip x̂ to [−c, c] at every step; None for unbounded data
    callback: Callback | None = None,
) -> Tensor:
    """EDM's deterministic second-order Heun sampler (Karras et al. 2022, arXiv 2206.00364, Alg. 1 with
    S_churn = 0) in its variables x = z/α and s = σ/α = e^(−λ/2): the probability-flow ODE dx/ds = (x − x̂)/s,
    an Euler step then the trapezoidal correction; 2T − 1 network evaluations for T steps."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()

    def data(x: Tensor, lam: Tensor) -> Tensor:  # x̂ at (x, λ) in the VE variables
        alpha, _ = alpha_sigma(lam)
        zz = alpha.to(x.dtype) * x
        return _x_hat(zz, denoise(zz, lam), lam, clip_denoised)

    x = z / alpha_sigma(lambdas[0])[0].to(z.dtype)
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        x_hat = data(x, lam)
        if i < total - 1:
            lam_next = lambdas[i + 1]
            s, s_next = torch.exp(-lam / 2), torch.exp(-lam_next / 2)
            dt = (s_next - s).to(x.dtype)
            d = (x - x_hat) / s.to(x.dtype)
            x_euler = x + dt * d
            d_next = (x_euler - data(x_euler, lam_next)) / s_next.to(x.dtype)
            x = x + dt * (d + d_next) / 2
        if callback is not None:
            callback(i, total, alpha_sigma(lam)[0].to(x.dtype) * x, x_hat)
    return x_hat
