"""Samplers as pure functions: no files, no logging, randomness only from the passed noise source.

Every sampler has the signature ``sampler(denoise, z, lambdas, *, noise=None, callback=None, **options)``:
    denoise    (z, λ) -> ε̃, e.g. `cfg.maths.guidance.guided_denoiser` (λ a scalar tensor); ddim and ancestral
               also accept a pair (ε̃, ε_renoise): x̂ from ε̃, the step renoises with ε_renoise (CFG++)
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


def _eps(out: Tensor | tuple[Tensor, Tensor], sampler: str) -> Tensor:
    # a sampler that renoises only through z: a denoiser's pair (ε̃, ε_renoise) has no meaning there
    if isinstance(out, tuple):
        raise ValueError(
            f"sampler {sampler!r} cannot renoise with a second ε (a guidance method such as cfgpp returned "
            "(ε̃, ε_renoise)); use sampler ddim or ancestral"
        )
    return out


def _renoised(z: Tensor, out: Tensor | tuple[Tensor, Tensor], x_hat: Tensor, lam: Tensor) -> Tensor:
    # the latent a step renoises from: z itself, or α x̂ + σ ε_renoise for a denoiser's pair (CFG++)
    if not isinstance(out, tuple):
        return z
    alpha, sigma = alpha_sigma(lam)
    return alpha.to(z.dtype) * x_hat + sigma.to(z.dtype) * out[1]


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
    For a denoiser's pair (ε̃, ε_renoise) z in μ̃ is α_λ x̂ + σ_λ ε_renoise (CFG++).
    """
    _check_lambdas(lambdas)
    noise = noise or (lambda t: torch.randn_like(z))
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        out = denoise(z, lam)
        x_hat = _x_hat(z, out[0] if isinstance(out, tuple) else out, lam, clip_denoised)
        if i == total - 1:
            if callback is not None:
                callback(i, total, z, x_hat)
            break
        z = _renoised(z, out, x_hat, lam)
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
    """Deterministic DDIM (Song et al. 2021, η = 0) on the same λ schedule: z' = α_λ' x̂ + σ_λ' ε̂ (ε̂ the
    denoiser's second ε when it returns a pair, CFG++)."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        out = denoise(z, lam)
        eps = out[0] if isinstance(out, tuple) else out
        x_hat = _x_hat(z, eps, lam, clip_denoised)
        if i < total - 1:
            alpha, sigma = alpha_sigma(lam)
            if isinstance(out, tuple):  # CFG++: renoise with the second ε
                eps = out[1]
            elif clip_denoised is not None:  # keep ε consistent with the clipped x̂
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

    with D = x̂_λ on the first step (which is then DDIM) and on the last, to λ_T where σ ≈ 0: as k-diffusion's
    `sample_dpmpp_2m` (first order into σ = 0) and diffusers' `lower_order_final`. The last move's h is as long
    as the first's on the cosine schedule, so r = h_prev / h is small there and the second-order D would
    extrapolate x̂ by 1 + 1/(2r) (≈ 5 at T = 8; on the 8×8 digits model at w = 0, 300 samples: FID 53.3
    with the second-order last move, 10.0 with the first-order one)."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()
    x_prev, h_prev = None, None
    x_hat = z
    for i in range(total):
        lam = lambdas[i]
        x_hat = _x_hat(z, _eps(denoise(z, lam), "dpmpp_2m"), lam, clip_denoised)
        if i < total - 1:
            lam_next = lambdas[i + 1]
            h = (lam_next - lam) / 2
            _, sigma = alpha_sigma(lam)
            alpha_n, sigma_n = alpha_sigma(lam_next)
            d = x_hat
            if x_prev is not None and i < total - 2:
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
    an Euler step then the trapezoidal correction.

    The first and the last move are Euler steps (2T − 3 network evaluations for T ≥ 3 steps; 2 for T = 2). The
    last, as in EDM's Alg. 1, because it ends at σ ≈ 0. The first because it starts at s = e^(−λ_min/2)
    (22,026 for λ_min = −20, far above EDM's σ_max = 80) and shrinks s by orders of magnitude: the trapezoidal
    rule weighs the slope at its end (ε̂ at the much lower noise level) like the slope at its start, an error
    of about s·|ε̂_1 − ε̂_0|/2 (FID 1,442 to 2,299 at w = 0 for T = 4 to 16 on the 8×8 digits model; 12.2 at
    T = 5 with the Euler first and last moves), while the Euler step from pure noise is DDIM's.
    Neither changes the order: a fixed number of Euler steps adds O(h²) to the global error."""
    _check_lambdas(lambdas)
    lambdas = lambdas.to(device=z.device, dtype=torch.float64)
    total = lambdas.numel()

    def data(x: Tensor, lam: Tensor) -> Tensor:  # x̂ at (x, λ) in the VE variables
        alpha, _ = alpha_sigma(lam)
        zz = alpha.to(x.dtype) * x
        return _x_hat(zz, _eps(denoise(zz, lam), "heun"), lam, clip_denoised)

    x = z / alpha_sigma(lambdas[0])[0].to(z.dtype)
    x_hat = z
    for i in range(total):
        lam = lam_x = lambdas[i]  # lam_x: where x is, handed to the callback at its own α
        x_hat = data(x, lam)
        if i < total - 1:
            lam_next = lam_x = lambdas[i + 1]
            s, s_next = torch.exp(-lam / 2), torch.exp(-lam_next / 2)
            dt = (s_next - s).to(x.dtype)
            d = (x - x_hat) / s.to(x.dtype)
            x = x + dt * d  # Euler
            if 0 < i < total - 2:  # Heun's trapezoidal correction on the interior moves
                d_next = (x - data(x, lam_next)) / s_next.to(x.dtype)
                x = x + dt * (d_next - d) / 2
        if callback is not None:
            callback(i, total, alpha_sigma(lam_x)[0].to(x.dtype) * x, x_hat)
    return x_hat
