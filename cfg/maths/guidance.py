"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ε̃ = (1 + w)·ε(z, c) − w·ε(z).

Convention: the paper's guidance strength w. w = 0 is plain conditional sampling, w = −1 is unconditional
sampling, w > 0 sharpens towards p(z|c)·p(c|z)^w. Libraries that follow Imagen and diffusers write the same
combination as ε(z) + s·(ε(z, c) − ε(z)) with ``guidance_scale`` s = 1 + w, so w = 0.3 here is s = 1.3 there,
and their s = 7.5 is w = 6.5 here (`w_to_guidance_scale`, `guidance_scale_to_w`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cfg.registry import Registry

# A network ε_θ(z, λ, c): images (B, C, H, W), log-SNR (B,), labels (B,) -> ε (B, C, H, W)
EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]
# What samplers call: (z, λ) -> ε̃, with λ a scalar tensor shared by the batch
Denoiser = Callable[[Tensor, Tensor], Tensor]


# name -> method(eps_c, eps_u, w, *, z, lam, **options) -> ε̃: how the two predictions become the guided one;
# w (B, 1, 1, 1) is the paper's guidance strength, z and λ the current latent and log-SNR (for methods that
# depend on them); options are the method's other keyword-only arguments
GUIDANCE: Registry[Callable[..., Tensor]] = Registry("guidance method", reserved=("z", "lam"))


@GUIDANCE.register("cfg")
def cfg(eps_c: Tensor, eps_u: Tensor, w: Tensor, *, z: Tensor, lam: Tensor) -> Tensor:
    """Classifier-free guidance, Ho & Salimans 2022 Eq. 6: ε̃ = (1 + w)·ε(z, c) − w·ε(z)."""
    return (1 + w) * eps_c - w * eps_u


def w_to_guidance_scale(w: float) -> float:
    """Paper's w to the diffusers / Imagen ``guidance_scale`` s = 1 + w."""
    return 1.0 + w


def guidance_scale_to_w(guidance_scale: float) -> float:
    """diffusers / Imagen ``guidance_scale`` s to the paper's w = s − 1."""
    return guidance_scale - 1.0


def needed_passes(w: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Rows of a batch with guidance strength w (scalar or (batch,)) that need the conditional pass (w != −1)
    and the unconditional pass (w != 0).

    Eq. 6 weighs ε(z, c) by 1 + w and ε(z) by w, so a row with w = 0 (conditional sampling) never needs ε(z)
    and a row with w = −1 (unconditional sampling) never needs ε(z, c). Returns (cond_rows, uncond_rows) as
    int64 index tensors on w's device; computed once per batch, so the network's batch size stays fixed.
    """
    w = torch.as_tensor(w)
    if w.dim() > 1 or (w.dim() == 1 and w.numel() != batch):
        raise ValueError(f"w must be a scalar or have shape ({batch},), got shape {tuple(w.shape)}")
    w = w.expand(batch)
    return torch.nonzero(w != -1).view(-1), torch.nonzero(w != 0).view(-1)


def guided_eps(
    model: EpsModel,
    z: Tensor,
    lam: Tensor,
    labels: Tensor,
    w: Tensor,
    null_label: int,
    *,
    passes: tuple[Tensor, Tensor] | None = None,  # `needed_passes(w, B)`: skip the passes whose weight is 0
    method: str = "cfg",  # a `GUIDANCE` entry
    options: dict | None = None,  # its options
) -> Tensor:
    """Guided ε̃ with per-example w; both passes run as one forward pass on one concatenated batch.

    z: (B, C, H, W); lam: (B,) or scalar; labels: (B,) integer; w: (B,) or scalar. Without `passes` every row
    gets both passes (a doubled batch); with them the network sees only the rows whose pass has a non-zero
    weight, and the skipped ε are exact zeros that Eq. 6 multiplies by 0.
    """
    b = z.shape[0]
    lam = lam.expand(b) if lam.dim() == 0 else lam
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    w = (w.expand(b) if w.dim() == 0 else w).view(b, *([1] * (z.dim() - 1)))  # (B, 1, 1, 1)
    null = torch.full_like(labels, null_label)
    combine = GUIDANCE[method]
    options = options or {}
    if passes is None:
        eps = model(torch.cat([z, z]), torch.cat([lam, lam]), torch.cat([labels, null]))  # (2B, C, H, W)
        eps_c, eps_u = eps.to(z.dtype).chunk(2)
        return combine(eps_c, eps_u, w, z=z, lam=lam, **options)
    cond, uncond = (rows.to(z.device) for rows in passes)
    n_c = cond.numel()
    eps = model(
        torch.cat([z[cond], z[uncond]]),
        torch.cat([lam[cond], lam[uncond]]),
        torch.cat([labels[cond], null[uncond]]),
    ).to(z.dtype)
    eps_c = torch.zeros_like(z).index_copy_(0, cond, eps[:n_c])
    eps_u = torch.zeros_like(z).index_copy_(0, uncond, eps[n_c:])
    return combine(eps_c, eps_u, w, z=z, lam=lam, **options)


def guided_denoiser(
    model: EpsModel,
    labels: Tensor,
    w: Tensor,
    null_label: int,
    method: str = "cfg",  # a `GUIDANCE` entry
    options: dict | None = None,  # its options
) -> Denoiser:
    """Bind labels and per-example w so that a sampler sees a plain (z, λ) -> ε̃ function.

    Rows with w = 0 or w = −1 run only the pass they use (`needed_passes`), decided once here.
    """
    w = torch.as_tensor(w)
    passes = needed_passes(w.to(labels.device), labels.shape[0])

    def denoise(z: Tensor, lam: Tensor) -> Tensor:
        lam_b = lam.to(device=z.device, dtype=z.dtype).expand(z.shape[0])
        return guided_eps(
            model, z, lam_b, labels, w, null_label, passes=passes, method=method, options=options
        )

    return denoise
