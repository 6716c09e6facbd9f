"""Guidance methods: how a sampler's ε̃ is made from the conditional and unconditional predictions.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) is ε̃ = (1 + w)·ε(z, c) − w·ε(z). The other entries of
`GUIDANCE` are the methods proposed since, each one function below with its paper's formula in its docstring.

Convention: the paper's guidance strength w. w = 0 is plain conditional sampling, w = −1 is unconditional
sampling, w > 0 sharpens towards p(z|c)·p(c|z)^w. Libraries that follow Imagen and diffusers write the same
combination as ε(z) + s·(ε(z, c) − ε(z)) with ``guidance_scale`` s = 1 + w, so w = 0.3 here is s = 1.3 there,
and their s = 7.5 is w = 6.5 here (`w_to_guidance_scale`, `guidance_scale_to_w`). Where a method's paper writes
a lerp with weight g, g = 1 + w here, so every method is swept over the same w grid.

A method is `fn(eps_c, eps_u, w, *, z, lam, step, <options>) -> ε̃`:
    eps_c, eps_u   ε(z, c) and ε(z) (or a weaker guide network's ε(z, c), `Traits.guide`), shaped like z
    w              (B, 1, …) the paper's guidance strength per row
    z, lam         the latent and its log-SNR (B,)
    step           `Step`: where λ sits in the sampling schedule and a per-trajectory state dict
It returns ε̃, or a pair (ε̃, ε_renoise) when the sampler must renoise with another ε than the one implied by
z and x̂ (CFG++; only samplers listed in `Traits.samplers` accept that). Its `Traits` (`method(...)` below) say
which rows need which network pass at a step (`passes`: the skipped prediction arrives as zeros and must not
change the result), where ε_u comes from, which samplers it works with, and the allowed values of string
options. `check_guidance` validates a method and its options (the params schema calls it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cfg.maths.diffusion import alpha_sigma
from cfg.registry import Registry

# A network ε_θ(z, λ, c): images (B, C, H, W), log-SNR (B,), labels (B,) -> ε (B, C, H, W)
EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]
# What samplers call: (z, λ) -> ε̃ (or (ε̃, ε_renoise), see above), with λ a scalar tensor shared by the batch
Denoiser = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]


@dataclass
class Step:
    """Where a denoiser call sits in the sampling schedule, and the trajectory's memory."""

    index: int | None = None  # position of λ in the schedule λ_1 < … < λ_T (0-based); None: no schedule known
    total: int | None = None  # T
    state: dict = field(default_factory=dict)  # per-trajectory memory (APG's momentum), fresh per batch

    @property
    def position(self) -> float:
        """s = index / (T − 1): 0 at the noisiest step, 1 at the last."""
        if self.index is None or not self.total:
            raise ValueError(
                "this guidance method needs the sampling schedule: pass lambdas to guided_denoiser"
            )
        return self.index / max(self.total - 1, 1)


# (w (B,), lam (B,), step, options) -> (rows needing ε(z, c), rows needing ε(z)) as boolean (B,) tensors
Passes = Callable[[Tensor, Tensor, Step, dict], tuple[Tensor, Tensor]]


def cfg_passes(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    """Eq. 6 weighs ε(z, c) by 1 + w and ε(z) by w: rows at w = 0 skip ε(z), rows at w = −1 skip ε(z, c)."""
    return w != -1, w != 0


def _cond_always(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    # methods whose result at w = −1 still depends on ε(z, c) (a rescale, a projection, a fitted scale)
    return torch.ones_like(w, dtype=torch.bool), w != 0


@dataclass(frozen=True)
class Traits:
    """What the engine needs to know about a method besides its formula."""

    passes: Passes = cfg_passes  # which rows need which pass at this step
    # ε_u from: the model's unconditional branch, or "guide_network" (autoguidance)
    guide: str = "unconditional"
    samplers: tuple[str, ...] | None = None  # samplers it works with; None: all
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # allowed values of string options


# name -> method(eps_c, eps_u, w, *, z, lam, step, **options) -> ε̃; options are the keyword-only arguments
GUIDANCE: Registry[Callable[..., Any]] = Registry("guidance method", reserved=("z", "lam", "step"))


def method(name: str, bounds: dict[str, tuple[float, float]] | None = None, **traits: Any) -> Callable:
    """Decorator: register `fn` in GUIDANCE under `name` with its `Traits`."""

    def add(fn: Callable) -> Callable:
        fn.traits = Traits(**traits)
        return GUIDANCE.register(name, bounds)(fn)

    return add


def traits(name: str) -> Traits:
    return GUIDANCE[name].traits


def needs_guide_network(entries: list[tuple[str, dict]]) -> bool:
    """Whether a method of these (method, options) pairs (`guidance_entries`) takes ε_u from a guide network
    (`Traits.guide`, autoguidance): the sample stage then needs one, and the train_guide stage trains it."""
    return any(traits(name).guide == "guide_network" for name, _ in entries)


def _expand(x: Tensor, like: Tensor) -> Tensor:
    """A per-row (B,) tensor as (B, 1, …) to broadcast over `like` (dtype kept)."""
    return x.reshape(x.shape[0], *([1] * (like.dim() - 1)))


def _dims(x: Tensor) -> list[int]:
    return list(range(1, x.dim()))


def _to_x(z: Tensor, eps: Tensor, lam: Tensor) -> Tensor:
    # x̂ = (z − σ ε) / α (Ho & Salimans Alg. 2, line 4), in float64: at λ = −20, 1/α ≈ 2·10⁴
    alpha, sigma = alpha_sigma(_expand(lam.double(), z))
    return (z.double() - sigma * eps.double()) / alpha


def _to_eps(z: Tensor, x: Tensor, lam: Tensor) -> Tensor:
    # the ε with which z = α x̂ + σ ε, in z's dtype
    alpha, sigma = alpha_sigma(_expand(lam.double(), z))
    return ((z.double() - alpha * x.double()) / sigma).to(z.dtype)


# ---------------------------------------------------------------------------------------------------------
# The methods


@method("cfg")
def cfg(
    eps_c: Tensor, eps_u: Tensor, w: Tensor, *, z: Tensor, lam: Tensor, step: Step | None = None
) -> Tensor:
    """Classifier-free guidance, Ho & Salimans 2022 Eq. 6: ε̃ = (1 + w)·ε(z, c) − w·ε(z)."""
    return (1 + w) * eps_c - w * eps_u


def _interval_w(w: Tensor, lam: Tensor, lambda_lo: float, lambda_hi: float) -> Tensor:
    inside = (lam >= lambda_lo) & (lam < lambda_hi)  # σ ∈ (σ_lo, σ_hi] with σ = e^(−λ/2)
    return torch.where(inside.view(-1, *([1] * (w.dim() - 1))), w, torch.zeros_like(w))


def _interval_passes(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    inside = (lam >= options["lambda_lo"]) & (lam < options["lambda_hi"])
    return cfg_passes(torch.where(inside, w, torch.zeros_like(w)), lam, step, options)


@method("interval", passes=_interval_passes)
def interval(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step,
    lambda_lo: float = -3.38,  # lowest guided log-SNR; −2 ln 5.42: σ_hi = 5.42
    lambda_hi: float = 2.546,  # guidance stops at this log-SNR; −2 ln 0.28: σ_lo = 0.28
) -> Tensor:
    """Guidance in a limited interval (Kynkäänniemi et al. 2024, arXiv 2404.07724, Eq. 4): Eq. 6 for
    λ ∈ [λ_lo, λ_hi), plain ε(z, c) outside, where ε(z) is not computed at all (`_interval_passes`).

    The paper's interval is in EDM's σ = e^(−λ/2): guide for σ ∈ (σ_lo, σ_hi], i.e. λ ∈ [−2 ln σ_hi, −2 ln σ_lo).
    The defaults are σ ∈ (0.28, 5.42], λ ∈ [−3.38, 2.546) (recalled, not checked here, as the paper's EDM2-S
    interval); the README's guidance-methods study ran with them. EDM2-XXL's, from its reference code
    (kynkaat/guidance-interval: `--guidance_interval="[17, 22]"`, G = 2.0, i.e. steps 17–22 of EDM's 32-step
    ρ = 7 schedule, whose Euler and Heun evaluations run from σ = 1.609 down to 0.189), is about (0.19, 1.61]:
    `lambda_lo=-0.951, lambda_hi=3.34`.
    """
    return cfg(eps_c, eps_u, _interval_w(w, lam, lambda_lo, lambda_hi), z=z, lam=lam)


def _schedule_factor(step: Step, shape: str) -> float:
    # w(s) / w with s = t / (T − 1) from the noisiest step (0) to the last (1); mean 1 over the T steps
    s = step.position
    return {"constant": 1.0, "linear": 2.0 * s, "cosine": 1.0 - math.cos(math.pi * s)}[shape]


def _schedule_passes(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    return cfg_passes(w * _schedule_factor(step, options["shape"]), lam, step, options)


@method("schedule", passes=_schedule_passes, choices={"shape": ("constant", "linear", "cosine")})
def schedule(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step,
    shape: str = "linear",  # constant (= cfg), linear or cosine, increasing from the noisy end
) -> Tensor:
    """A schedule of w over the sampling steps (Wang et al. 2024, arXiv 2404.13040, heuristic increasing
    schedulers): Eq. 6 with w(s), s = t/(T − 1) the position of the step from the noisiest (0) to the last (1),

        linear  w(s) = 2w·s,    cosine  w(s) = w·(1 − cos πs),    constant  w(s) = w,

    each with mean w over the T steps, so that a schedule and CFG at the same w spend the same guidance. The
    schedule is of w (the guided part), so w(0) = 0 is conditional sampling; scheduling their lerp weight
    1 + w instead would start at unconditional.
    """
    return cfg(eps_c, eps_u, w * _schedule_factor(step, shape), z=z, lam=lam)


@method("rescale", bounds={"phi": (0.0, 1.0)}, passes=_cond_always)
def rescale(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step | None = None,
    phi: float = 0.7,  # φ: share of the rescaled prediction (0: plain CFG); the paper recommends 0.7
) -> Tensor:
    """CFG rescale (Lin et al. 2024, arXiv 2305.08891, Sec. 3.4, Eqs. 15-18) on the data prediction x̂:

        x_cfg = x̂_u + (1 + w)(x̂_c − x̂_u),   x_rescaled = x_cfg · std(x̂_c) / std(x_cfg),
        x_final = φ·x_rescaled + (1 − φ)·x_cfg,

    std over each sample's pixels; returned as the ε with z = α x_final + σ ε. The paper writes x (its
    Algorithm 2 applies the same lines to a v-prediction network's output; diffusers' `rescale_noise_cfg` to ε);
    here x̂, whose scale is that of the data at every λ.
    """
    x_c, x_u = _to_x(z, eps_c, lam), _to_x(z, eps_u, lam)
    x_cfg = x_c + w.double() * (x_c - x_u)  # = x̂_u + (1 + w)(x̂_c − x̂_u), exactly x̂_c at w = 0
    factor = x_c.std(dim=_dims(z), keepdim=True) / x_cfg.std(dim=_dims(z), keepdim=True)
    x_final = x_cfg * (phi * factor + (1 - phi))
    return _to_eps(z, x_final, lam)


@method("threshold", bounds={"p": (0.5, 1.0)})
def threshold(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step | None = None,
    p: float = 0.995,  # the quantile of |x̂| taken as s
) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): of the guided x̂ = (z − σ ε̃)/α, s = the
    p-quantile of |x̂| per sample, s ← max(s, 1), x̂ ← clip(x̂, −s, s)/s; returned as the ε with
    z = α x̂ + σ ε. p = 0.995 as diffusers' `dynamic_thresholding_ratio`; no upper cap on s (Imagen).
    With the sampler's static clip (sample.clip_denoised = 1) it replaces clipping by rescaling."""
    x = _to_x(z, cfg(eps_c, eps_u, w, z=z, lam=lam), lam)
    flat = x.reshape(x.shape[0], -1).abs()
    s = torch.quantile(flat, p, dim=1).clamp(min=1.0)  # (B,)
    s = _expand(s, x)
    return _to_eps(z, torch.maximum(torch.minimum(x, s), -s) / s, lam)


@method(
    "apg",
    bounds={"eta": (0.0, 1.0), "norm_threshold": (0.0, math.inf), "momentum": (-1.0, 1.0)},
    passes=_cond_always,
)
def apg(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step,
    eta: float = 0.0,  # η: weight of the guidance part parallel to x̂_c (1: no down-weighting)
    norm_threshold: float = 2.5,  # r: clamp ‖Δ‖ to r per sample; 0 disables
    momentum: float = -0.75,  # β: Δ ← Δ + β·Δ_previous (negative: reverse momentum); 0 disables
) -> Tensor:
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416, Alg. 1) on the data prediction:

        Δ = x̂_c − x̂_u;  Δ ← Δ + β·Δ_prev (running);  Δ ← Δ·min(1, r/‖Δ‖);
        Δ∥ = ⟨Δ, x̂_c⟩/‖x̂_c‖² · x̂_c,  Δ⊥ = Δ − Δ∥;   x̂ = x̂_c + w·(Δ⊥ + η·Δ∥)

    per sample, as the authors' reference `normalized_guidance` (defaults η = 0, r = 2.5, β = −0.75 from it;
    r is in x̂'s norm, whose size grows with the image). The momentum runs over the denoiser calls of one
    trajectory (Heun calls twice per step). η = 1, r = 0, β = 0 is CFG."""
    x_c, x_u = _to_x(z, eps_c, lam), _to_x(z, eps_u, lam)
    diff = x_c - x_u
    if momentum != 0:
        diff = diff + momentum * step.state.get("apg_running", 0.0)
        step.state["apg_running"] = diff
    if norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1).view(-1, *([1] * (diff.dim() - 1)))
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    unit = torch.nn.functional.normalize(x_c.flatten(1), dim=1).view_as(x_c)
    parallel = (diff * unit).sum(dim=_dims(diff), keepdim=True) * unit
    update = (diff - parallel) + eta * parallel
    return _to_eps(z, x_c + w.double() * update, lam)


def _zero_star_passes(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    if step.index is not None and step.index < options["zero_steps"]:
        none = torch.zeros_like(w, dtype=torch.bool)
        return none, none  # a zeroed step needs no network at all
    if not options["optimized_scale"]:
        return cfg_passes(w, lam, step, options)
    return _cond_always(w, lam, step, options)


@method("cfg_zero_star", bounds={"zero_steps": (0, 1_000_000)}, passes=_zero_star_passes)
def cfg_zero_star(
    eps_c: Tensor,
    eps_u: Tensor,
    w: Tensor,
    *,
    z: Tensor,
    lam: Tensor,
    step: Step,
    optimized_scale: bool = True,  # α* = ⟨ε_c, ε_u⟩/‖ε_u‖² per sample; false: α = 1
    zero_steps: int = 1,  # the first steps whose prediction is zeroed (zero-init)
) -> Tensor:
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886, Eqs. 10-12 and zero-init):

        ε̃ = α*·ε_u + (1 + w)·(ε_c − α*·ε_u),   α* = ⟨ε_c, ε_u⟩ / (‖ε_u‖² + 1e-8)  per sample,

    and for the first `zero_steps` steps of the schedule a zero prediction. As the authors' code
    (WeichenFan/CFG-Zero-star, `optimized_scale`; `if i <= zero_init_steps: noise_pred *= 0` with
    zero_init_steps = 0 zeroes the first step) applies both to its network's output, a flow-matching velocity
    v = ε − x, a zero prediction here is v = 0: ε̃ = x̂ = z/(α + σ), the ε with which the step keeps
    z/(α + σ) (the flow-matching state) where it is. α* is fitted on our network's output, ε.
    """
    if step.index is not None and step.index < zero_steps:
        alpha, sigma = alpha_sigma(_expand(lam.double(), z))
        return (z.double() / (alpha + sigma)).to(z.dtype)
    if not optimized_scale:
        return cfg(eps_c, eps_u, w, z=z, lam=lam)
    c, u = eps_c.flatten(1).double(), eps_u.flatten(1).double()
    a = _expand(((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).to(z.dtype), z)  # (B, 1, …)
    return a * eps_u + (1 + w) * (eps_c - a * eps_u)


def _cfgpp_passes(w: Tensor, lam: Tensor, step: Step, options: dict) -> tuple[Tensor, Tensor]:
    return w != -1, torch.ones_like(w, dtype=torch.bool)  # ε(z) renoises every row


@method("cfgpp", passes=_cfgpp_passes, samplers=("ddim", "ancestral"))
def cfgpp(
    eps_c: Tensor, eps_u: Tensor, w: Tensor, *, z: Tensor, lam: Tensor, step: Step | None = None
) -> tuple[Tensor, Tensor]:
    """CFG++ (Chung et al. 2024, arXiv 2406.08070, Alg. 1): x̂ from ε̂ = ε_u + g·(ε_c − ε_u), g = 1 + w (the
    paper's λ ∈ [0, 1] is w ∈ [−1, 0]), and the step renoises with ε_u instead of ε̂. DDIM:
    z' = α' x̂ + σ' ε_u; ancestral (as the authors' Euler-ancestral CFG++, k-diffusion `d = to_d(x, σ,
    uncond_denoised)`): the mean with z replaced by α x̂ + σ ε_u. Returns (ε̂, ε_u)."""
    return cfg(eps_c, eps_u, w, z=z, lam=lam), eps_u


@method("autoguidance", guide="guide_network")
def autoguidance(
    eps_c: Tensor, eps_u: Tensor, w: Tensor, *, z: Tensor, lam: Tensor, step: Step | None = None
) -> Tensor:
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507, Eq. 2): D_w = D_1 + g·(D_0 − D_1) with g = 1 + w and
    the guide D_1 a weaker version of the conditional model (smaller and/or shorter trained, the same
    conditioning), as NVlabs/edm2's `generate_images.py` (`gnet`, `ref_Dx.lerp(Dx, guidance)`): Eq. 6 with
    eps_u = ε_guide(z, c) (`Traits.guide`). With the model's own unconditional branch as guide it is CFG."""
    return cfg(eps_c, eps_u, w, z=z, lam=lam)


# ---------------------------------------------------------------------------------------------------------
# Validation and the engine


def check_guidance(
    name: str, options: dict | None, where: str = "guidance", sampler: str | None = None
) -> dict:
    """`options` of method `name` resolved (`Registry.resolve`: unknown keys, types, bounds) and checked for
    what the registry cannot see: string choices, an empty interval, a sampler the method does not work
    with. Raises ValueError naming the value and what is accepted; returns the resolved options."""
    resolved = GUIDANCE.resolve(name, options, where)
    t = traits(name)
    for key, allowed in t.choices.items():
        if resolved[key] not in allowed:
            raise ValueError(
                f"{where}.{key} = {resolved[key]!r} is not allowed; choose one of {list(allowed)}"
            )
    if name == "interval" and not resolved["lambda_lo"] < resolved["lambda_hi"]:
        raise ValueError(
            f"{where}: lambda_lo = {resolved['lambda_lo']} must be below lambda_hi = {resolved['lambda_hi']}"
        )
    if sampler is not None and t.samplers is not None and sampler not in t.samplers:
        raise ValueError(
            f"{where}: guidance method {name!r} works with the samplers {list(t.samplers)} only "
            f"(it changes how a step renoises), not sample.sampler = {sampler!r}"
        )
    return resolved


def guidance_entries(
    entries: dict, sampler: str | None = None, where: str = "sample.guidance"
) -> list[tuple[str, dict]]:
    """params.yaml's `sample.guidance` as (method, resolved options) in its order.

    `entries` maps a label to the options of the method of that name, or (a second variant of one method) to
    `{method: <name>, <options>}`; `null` or `{}` means the defaults: `{cfg: null, apg_eta1: {method: apg,
    eta: 1.0}}`. Raises ValueError naming the offending entry and what is accepted; two entries that resolve
    to the same method and options are refused (their cells would be one).
    """
    if not isinstance(entries, dict) or not entries:
        raise ValueError(
            f"{where} = {entries!r} must be a non-empty mapping of label -> options, e.g. {{cfg: {{}}}}"
        )
    out: list[tuple[str, dict]] = []
    for label, options in entries.items():
        here = f"{where}.{label}"
        if not isinstance(label, str) or not label.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: label {label!r} must be letters, digits, '_' or '-'")
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"{here} = {options!r} must be a mapping of options (or null for the defaults)")
        options = dict(options or {})
        name = options.pop("method", label)
        if name not in GUIDANCE:
            raise ValueError(
                f"{here}: {name!r} is no guidance method; give one of {list(GUIDANCE)} as the label or as "
                f"{here}.method"
            )
        entry = (name, check_guidance(name, options, here, sampler))
        if entry in out:
            raise ValueError(f"{here} repeats guidance {name!r} with the same options {entry[1]}")
        out.append(entry)
    return out


def w_to_guidance_scale(w: float) -> float:
    """Paper's w to the diffusers / Imagen ``guidance_scale`` s = 1 + w."""
    return 1.0 + w


def guidance_scale_to_w(guidance_scale: float) -> float:
    """diffusers / Imagen ``guidance_scale`` s to the paper's w = s − 1."""
    return guidance_scale - 1.0


def needed_passes(w: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Rows of a batch with guidance strength w (scalar or (batch,)) that need the conditional pass (w != −1)
    and the unconditional pass (w != 0) under CFG (`cfg_passes`).

    Eq. 6 weighs ε(z, c) by 1 + w and ε(z) by w, so a row with w = 0 (conditional sampling) never needs ε(z)
    and a row with w = −1 (unconditional sampling) never needs ε(z, c). Returns (cond_rows, uncond_rows) as
    int64 index tensors on w's device.
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
    passes: tuple[Tensor, Tensor] | None = None,  # (cond_rows, uncond_rows) to run; None: every row both
    method: str = "cfg",  # a `GUIDANCE` entry
    options: dict | None = None,  # its options
    step: Step | None = None,  # position in the schedule and trajectory state (methods that need them)
    guide: EpsModel | None = None,  # the guide network of methods with Traits.guide = "guide_network"
) -> Tensor | tuple[Tensor, Tensor]:
    """Guided ε̃ with per-example w; both passes run as one forward pass on one concatenated batch.

    z: (B, C, H, W); lam: (B,) or scalar; labels: (B,) integer; w: (B,) or scalar. Without `passes` every row
    gets both passes (a doubled batch); with them the network sees only those rows, and the skipped ε are exact
    zeros that the method does not use there (`Traits.passes`). A method whose guide is a guide network runs it
    as a second call on its rows, with the labels.
    """
    b = z.shape[0]
    lam = lam.expand(b) if lam.dim() == 0 else lam
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
    w = (w.expand(b) if w.dim() == 0 else w).view(b, *([1] * (z.dim() - 1)))  # (B, 1, 1, 1)
    combine = GUIDANCE[method]
    uses_guide = combine.traits.guide == "guide_network"
    if uses_guide and guide is None:
        raise ValueError(f"guidance method {method!r} needs a guide network (guide=...), got none")
    options = options or {}
    step = step or Step()
    null = torch.full_like(labels, null_label)
    if passes is None:
        every = torch.arange(b, device=z.device)
        passes = (every, every)
    cond, uncond = (rows.to(z.device) for rows in passes)
    n_c = cond.numel()
    if n_c + uncond.numel() == 0:  # e.g. CFG-Zero*'s zeroed steps: no network at all
        eps = z[:0]
    elif uses_guide:
        eps = torch.cat(
            [
                model(z[cond], lam[cond], labels[cond]).to(z.dtype) if n_c else z[:0],
                guide(z[uncond], lam[uncond], labels[uncond]).to(z.dtype) if uncond.numel() else z[:0],
            ]
        )
    elif n_c == b and uncond.numel() == b:
        eps = model(torch.cat([z, z]), torch.cat([lam, lam]), torch.cat([labels, null])).to(z.dtype)
    else:
        eps = model(
            torch.cat([z[cond], z[uncond]]),
            torch.cat([lam[cond], lam[uncond]]),
            torch.cat([labels[cond], null[uncond]]),
        ).to(z.dtype)
    if n_c == b and uncond.numel() == b:
        eps_c, eps_u = eps.chunk(2)  # (B, C, H, W) each
    else:
        eps_c = torch.zeros_like(z).index_copy_(0, cond, eps[:n_c])
        eps_u = torch.zeros_like(z).index_copy_(0, uncond, eps[n_c:])
    return combine(eps_c, eps_u, w, z=z, lam=lam, step=step, **options)


def guided_denoiser(
    model: EpsModel,
    labels: Tensor,
    w: Tensor,
    null_label: int,
    method: str = "cfg",  # a `GUIDANCE` entry
    options: dict | None = None,  # its options
    *,
    lambdas: Tensor | None = None,  # the sampling schedule: methods that depend on the step read it
    guide: EpsModel | None = None,  # autoguidance's guide network ε_guide(z, λ, c)
) -> Denoiser:
    """Bind labels, per-example w, the method and its options so that a sampler sees a (z, λ) -> ε̃ function.

    Each call runs only the passes the method needs at that step (`Traits.passes`; for CFG rows with w = 0
    skip ε(z) and rows with w = −1 skip ε(z, c)). The trajectory's state (APG's momentum) lives in this
    closure: one denoiser per batch.
    """
    w = torch.as_tensor(w).to(labels.device)
    t = traits(method)
    options = dict(options or {})
    schedule = None if lambdas is None else lambdas.detach().double().cpu()
    state: dict = {}
    fixed = needed_passes(w, labels.shape[0]) if t.passes is cfg_passes else None

    def denoise(z: Tensor, lam: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        lam_b = lam.to(device=z.device, dtype=z.dtype).expand(z.shape[0])
        index = None if schedule is None else int((schedule - float(lam)).abs().argmin())
        step = Step(index, None if schedule is None else len(schedule), state)
        if fixed is not None:
            passes = fixed
        else:
            w_b = w.to(z.device).expand(z.shape[0])
            need_c, need_u = t.passes(w_b, lam_b, step, options)
            passes = (torch.nonzero(need_c).view(-1), torch.nonzero(need_u).view(-1))
        return guided_eps(
            model,
            z,
            lam_b,
            labels,
            w,
            null_label,
            passes=passes,
            method=method,
            options=options,
            step=step,
            guide=guide,
        )

    return denoise
