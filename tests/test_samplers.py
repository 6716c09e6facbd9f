"""Samplers driven by the exact ε-predictor of known distributions reproduce those distributions.

Tolerances (stated, and met with room to spare on 40,000 samples, T = 256):
    mean: |Δμ| ≤ 0.03 per coordinate; covariance: max |ΔΣ_ij| ≤ 0.06 (data of unit scale).
With 40,000 samples the Monte-Carlo standard error of a mean is ~0.005 and of a variance ~0.007.
"""

import pytest
import torch

from cfg.maths.diffusion import alpha_sigma, sampling_lambdas
from cfg.maths.guidance import guided_denoiser
from cfg.maths.noise import example_noise, generator_source, stream_source
from cfg.maths.samplers import SAMPLERS

from .analytic import GaussianMixtureEps

N = 40_000
T = 256
MEAN_TOL = 0.03
COV_TOL = 0.06


def _run(name, model, labels, w, seed=0, n=N, steps=T):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    denoise = guided_denoiser(model, labels, torch.as_tensor(w, dtype=torch.float64), model.null_label)
    return SAMPLERS[name](denoise, z, sampling_lambdas(steps), noise=generator_source(z, gen))


def _cov(x):
    return torch.cov(x.T)


GAUSS_MEAN = torch.tensor([[0.8, -0.5]])
GAUSS_COV = torch.tensor([[[0.6, 0.25], [0.25, 0.4]]])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_gaussian_moments(name):
    model = GaussianMixtureEps(GAUSS_MEAN, GAUSS_COV)
    x = _run(name, model, torch.zeros(N, dtype=torch.long), 0.0)
    assert (x.mean(0) - GAUSS_MEAN[0]).abs().max().item() <= MEAN_TOL
    assert (_cov(x) - GAUSS_COV[0]).abs().max().item() <= COV_TOL


# two classes, well separated along the first axis, one Gaussian each
MIX_MEANS = torch.tensor([[-1.0, 0.0], [1.0, 0.3]])
MIX_COVS = torch.tensor([[[0.3, 0.05], [0.05, 0.2]], [[0.25, -0.05], [-0.05, 0.3]]])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_mixture_w0_is_the_class_component(name):
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    for c in (0, 1):
        x = _run(name, model, torch.full((N,), c), 0.0)
        assert (x.mean(0) - MIX_MEANS[c]).abs().max().item() <= MEAN_TOL
        assert (_cov(x) - MIX_COVS[c]).abs().max().item() <= COV_TOL


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_mixture_w_minus_one_is_the_mixture(name):
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    x = _run(name, model, torch.zeros(N, dtype=torch.long), -1.0)
    mean = MIX_MEANS.mean(0)
    diff = MIX_MEANS - mean
    cov = MIX_COVS.mean(0) + (diff[:, :, None] * diff[:, None, :]).mean(0)  # law of total covariance
    assert (x.mean(0) - mean).abs().max().item() <= MEAN_TOL
    assert (_cov(x) - cov).abs().max().item() <= COV_TOL


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_positive_w_moves_towards_the_conditioned_component(name):
    """Guidance samples ∝ p(x|c)·p(c|x)^w: larger w raises p(c|x) and pushes samples away from other classes.

    For these components the tilted density p(x|c)·p(c|x)^w has its mean further from the other class than
    component c's mean (computed on a grid below), and samples must shift the same way, monotonically in w.
    """
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    c = 1
    lam_end = torch.full((N,), 20.0)
    n = 10_000
    shifts, posteriors = [], []
    for w in (0.0, 1.0, 3.0):
        x = _run(name, model, torch.full((n,), c), w, n=n)
        shifts.append(x[:, 0].mean().item())
        posteriors.append(model.class_posterior(x, lam_end[:n])[:, c].mean().item())

    # the guided target p(x|c) p(c|x)^w at λ_max, integrated on a grid: its mean along the first axis
    g = torch.linspace(-4, 5, 451, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    lam = torch.full((pts.shape[0],), 20.0)
    post = model.class_posterior(pts, lam)[:, c]
    log_pc = torch.distributions.MultivariateNormal(MIX_MEANS[c].double(), MIX_COVS[c].double()).log_prob(pts)
    target_means = []
    for w in (0.0, 1.0, 3.0):
        dens = torch.exp(log_pc + w * post.log())
        target_means.append(((dens * pts[:, 0]).sum() / dens.sum()).item())

    assert target_means[0] < target_means[1] < target_means[2], (
        "the tilted target must move away from class 0"
    )
    assert shifts[0] < shifts[1] < shifts[2], f"sample means {shifts} must move away from class 0 as w grows"
    assert posteriors[0] < posteriors[1] < posteriors[2], f"p(c|x) of samples {posteriors} must grow with w"
    assert shifts[0] == pytest.approx(target_means[0], abs=MEAN_TOL), "w = 0 must match component c"


def test_same_seed_same_samples():
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    labels = torch.ones(500, dtype=torch.long)
    for name in SAMPLERS:
        a = _run(name, model, labels, 0.5, seed=7, n=500, steps=32)
        b = _run(name, model, labels, 0.5, seed=7, n=500, steps=32)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = _run("ancestral", model, labels, 0.5, seed=8, n=500, steps=32)
    assert not torch.equal(a, c)


def test_rows_with_the_same_streams_give_identical_samples():
    """Copies of one example (one per w) with the same w share their per-example streams: identical samples."""
    model = GaussianMixtureEps(MIX_MEANS, MIX_COVS)
    ids = torch.arange(50).repeat(3)  # three copies of examples 0..49
    z = example_noise(7, ids, 0, (2,), dtype=torch.float64)
    labels = torch.ones(150, dtype=torch.long)
    denoise = guided_denoiser(model, labels, torch.zeros(150, dtype=torch.float64), model.null_label)
    noise = stream_source(7, ids, (2,), dtype=torch.float64)
    x = SAMPLERS["ancestral"](denoise, z, sampling_lambdas(16), noise=noise)
    torch.testing.assert_close(x[:50], x[50:100], rtol=0, atol=0)
    torch.testing.assert_close(x[:50], x[100:], rtol=0, atol=0)
    assert not torch.equal(x[:25], x[25:50])


def test_unknown_sampler_and_bad_schedule():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        SAMPLERS["euler"]
    with pytest.raises(ValueError, match="increase"):
        SAMPLERS["ddim"](lambda z, lam: z, torch.zeros(2, 2), torch.tensor([1.0, 0.0]))


def _exact_ode_endpoint(model, z, lambdas, mean, var):
    """The probability-flow ODE's exact solution for diagonal Gaussian data N(mean, diag(var)): each coordinate
    keeps its standardised value (z − α m) / sqrt(α² s² + σ²); x̂ at λ_T is the exact denoiser there."""
    a0, s0 = alpha_sigma(lambdas[0])
    a1, s1 = alpha_sigma(lambdas[-1])
    z_end = a1 * mean + (z - a0 * mean) * torch.sqrt((a1**2 * var + s1**2) / (a0**2 * var + s0**2))
    lam = torch.full((z.shape[0],), float(lambdas[-1]), dtype=torch.float64)
    eps = model(z_end, lam, torch.zeros(z.shape[0], dtype=torch.long))
    return (z_end - s1 * eps) / a1


def test_second_order_samplers_converge_at_second_order_on_the_exact_ode():
    """Against the exact ODE endpoint (diagonal Gaussian data), on λ grids of uniform spacing, DPM-Solver++(2M)'s
    error falls ~4x per doubling of the steps (second order; measured 3.6-4.0) and is far below DDIM's (first
    order, ~2x) at the same step count."""
    mean, var = torch.tensor([0.8, -0.5]), torch.tensor([0.6, 0.05])
    model = GaussianMixtureEps(mean[None], torch.diag(var)[None])
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.zeros(500, dtype=torch.long)
    denoise = guided_denoiser(model, labels, torch.zeros((), dtype=torch.float64), model.null_label)
    err = {}
    for name in ("ddim", "dpmpp_2m", "heun"):
        for steps in (32, 64, 128):
            lambdas = torch.linspace(-10.0, 10.0, steps, dtype=torch.float64)
            exact = _exact_ode_endpoint(model, z, lambdas.double(), mean.double(), var.double())
            err[name, steps] = (SAMPLERS[name](denoise, z, lambdas) - exact).abs().max().item()
    for steps in (32, 64):
        assert err["dpmpp_2m", steps] / err["dpmpp_2m", 2 * steps] > 3.0, err  # second order: ~4
        assert err["ddim", steps] / err["ddim", 2 * steps] < 2.6, err  # first order: ~2
    assert err["dpmpp_2m", 32] < err["ddim", 32] / 5, err
    assert err["dpmpp_2m", 128] < 2e-3, err
    for steps in (32, 64):  # EDM's Heun: second order too (2T - 3 evaluations)
        assert err["heun", steps] / err["heun", 2 * steps] > 3.0, err
    assert err["heun", 64] < err["ddim", 64] / 5, err


def test_few_step_second_order_samplers_on_the_sampling_schedule():
    """On the sampling schedule itself (uniform u, `sampling_lambdas`: at T = 8 the first move goes from
    s = σ/α = e^10 down to s ≈ 4 and the last one as far into σ ≈ 0), DPM-Solver++(2M) and Heun beat DDIM against
    the exact ODE endpoint at every few-step T. Guards the Euler first/last moves of Heun (a trapezoidal correction
    there multiplies ε̂'s change by s ≈ e^10) and DPM-Solver++'s first-order last move (its second-order D would
    extrapolate x̂ by 1 + 1/(2r) ≈ 5)."""
    mean, var = torch.tensor([0.8, -0.5]), torch.tensor([0.6, 0.05])
    model = GaussianMixtureEps(mean[None], torch.diag(var)[None])
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.zeros(500, dtype=torch.long)
    denoise = guided_denoiser(model, labels, torch.zeros((), dtype=torch.float64), model.null_label)
    for steps in (5, 8, 16):
        lambdas = sampling_lambdas(steps)
        exact = _exact_ode_endpoint(model, z, lambdas, mean.double(), var.double())
        err = {name: (SAMPLERS[name](denoise, z, lambdas) - exact).abs().max().item() for name in SAMPLERS}
        assert err["dpmpp_2m"] < err["ddim"], (steps, err)
        assert err["heun"] < err["ddim"], (steps, err)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_hands_over_the_latent_the_next_step_starts_from(name):
    """callback(i, T, z, x̂) hands over the latent after step i: the z (and λ_{i+1}) of the sampler's next
    evaluation of the denoiser, and after the last step the z of its last evaluation, at λ_T. Checked on 64
    uniform log-SNRs with the exact ε-predictor of Gaussian data; Heun's (evaluated twice at each λ) once gave
    its latent scaled by α at the λ before."""
    model = GaussianMixtureEps(GAUSS_MEAN, GAUSS_COV)
    n, steps = 200, 64
    lambdas = torch.linspace(-10.0, 10.0, steps, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    guided = guided_denoiser(model, torch.zeros(n, dtype=torch.long), torch.zeros((), dtype=torch.float64), 1)
    events = []  # ("eval", λ, z) and ("callback", i, z) in the order they happened

    def denoise(zz, lam):
        events.append(("eval", float(lam), zz.clone()))
        return guided(zz, lam)

    def callback(i, total, zi, x_hat):
        assert total == steps
        events.append(("callback", i, zi.clone()))

    SAMPLERS[name](denoise, z, lambdas, noise=generator_source(z, gen), callback=callback)
    calls = [k for k, e in enumerate(events) if e[0] == "callback"]
    assert [events[k][1] for k in calls] == list(range(steps))
    for k in calls:
        i, zi = events[k][1:]
        if i < steps - 1:
            _, lam, z_eval = next(e for e in events[k + 1 :] if e[0] == "eval")
            assert lam == float(lambdas[i + 1]), (i, lam)
        else:
            _, lam, z_eval = next(e for e in reversed(events[:k]) if e[0] == "eval")
            assert lam == float(lambdas[-1]), lam
        torch.testing.assert_close(zi, z_eval, rtol=1e-12, atol=1e-12, msg=f"step {i}")
