"""Exact ε-predictors for data whose noisy marginals are known in closed form (test helpers).

For x ~ N(μ, Σ) and z = α x + σ ε, z ~ N(α μ, C) with C = α² Σ + σ² I, and the optimal (MMSE) ε-predictor is
E[ε | z] = σ C⁻¹ (z − α μ). A mixture Σ_k π_k N(μ_k, Σ_k) with one component per class gives the conditional
predictor of component c and the unconditional one as the posterior-weighted sum over components.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cfg.maths.diffusion import alpha_sigma


class GaussianMixtureEps:
    """ε*(z, λ, c) for a mixture with one Gaussian component per class; label K means unconditional."""

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None):
        self.means = means.double()  # (K, D)
        self.covs = covs.double()  # (K, D, D)
        k = means.shape[0]
        self.weights = (weights if weights is not None else torch.full((k,), 1.0 / k)).double()
        self.null_label = k

    def _component_terms(self, z: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        # per component k: ε_k = σ C_k⁻¹ (z − α μ_k) and log N(z; α μ_k, C_k); z (B, D), lam (B,)
        eps_k = torch.empty(z.shape[0], *self.means.shape, dtype=torch.float64)  # (B, K, D)
        logp = torch.empty(z.shape[0], self.means.shape[0], dtype=torch.float64)  # (B, K)
        eye = torch.eye(z.shape[1], dtype=torch.float64)
        for value in lam.double().unique():  # samplers share one λ per step: invert each C_k once
            rows = lam.double() == value
            alpha, sigma = alpha_sigma(value)
            c = alpha**2 * self.covs + sigma**2 * eye  # (K, D, D)
            c_inv = torch.linalg.inv(c)
            diff = z[rows][:, None, :] - alpha * self.means[None]  # (b, K, D)
            sol = torch.einsum("kij,bkj->bki", c_inv, diff)  # C⁻¹ (z − α μ)
            eps_k[rows] = sigma * sol
            logdet = torch.linalg.slogdet(c).logabsdet  # (K,)
            logp[rows] = -0.5 * ((diff * sol).sum(-1) + logdet + z.shape[1] * math.log(2 * math.pi))
        return eps_k, logp

    def class_posterior(self, z: Tensor, lam: Tensor) -> Tensor:
        """p(k | z_λ), (B, K)."""
        _, logp = self._component_terms(z.double(), lam)
        return torch.softmax(logp + self.weights.log()[None], dim=1)

    def __call__(self, z: Tensor, lam: Tensor, labels: Tensor) -> Tensor:
        z64 = z.double()
        eps_k, logp = self._component_terms(z64, lam)
        post = torch.softmax(logp + self.weights.log()[None], dim=1)  # (B, K)
        eps_uncond = (post[:, :, None] * eps_k).sum(1)
        cond = labels.clamp(max=self.null_label - 1)
        eps_cond = eps_k[torch.arange(z.shape[0]), cond]
        out = torch.where((labels == self.null_label)[:, None], eps_uncond, eps_cond)
        return out.to(z.dtype)
