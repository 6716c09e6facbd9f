"""Step 3 of the metrics: distances from generated features and reference statistics, and the registry
`METRICS` of what a cell records.

The maths is torchmetrics' and torch-fidelity's wherever they implement it (each function names the routine);
this module feeds them precomputed features in float64.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from cfg.eval.features import Features
from cfg.eval.fingerprint import check_pair
from cfg.eval.stats import ReferenceStats, gaussian_stats
from cfg.registry import Registry


def _frechet(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    from torchmetrics.image.fid import _compute_fid

    # ||mu1 - mu2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½): torchmetrics.image.fid._compute_fid, which takes the trace
    # of the square root as the sum of sqrt(eigvals(Σ1 Σ2)) (torch.linalg.eigvals), here in float64
    return float(_compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double()))


def fid(gen: Features, ref: ReferenceStats) -> float:
    """Fréchet distance between Gaussians fitted to generated and reference features (Heusel et al. 2017)."""
    check_pair(gen, ref)
    mu, sigma = gaussian_stats(gen.features)
    return _frechet(mu, sigma, ref.mu, ref.sigma)


def per_class_fid(
    gen: Features,
    gen_labels: Tensor,  # (N_gen,) int64: the class each sample was conditioned on
    ref: ReferenceStats,
    ref_labels: Tensor | None = None,  # (N_ref,) int64; default: ref.labels
) -> dict[int, float]:
    """FID between generated and real features of each class in `gen_labels`."""
    check_pair(gen, ref)
    ref_labels = ref.labels if ref_labels is None else ref_labels
    if ref_labels is None:
        raise ValueError("per_class_fid needs reference labels: pass ref_labels or build ref with labels=")
    if gen_labels.shape != (len(gen),) or ref_labels.shape != (ref.n,):
        raise ValueError(
            f"labels must match the feature counts: gen {tuple(gen_labels.shape)} vs {len(gen)}, "
            f"ref {tuple(ref_labels.shape)} vs {ref.n}"
        )
    gen_labels, ref_labels = gen_labels.cpu(), ref_labels.cpu()
    classes = sorted(int(c) for c in gen_labels.unique())
    counts = {c: (int((gen_labels == c).sum()), int((ref_labels == c).sum())) for c in classes}
    short = {c: n for c, n in counts.items() if min(n) < 2}
    if short:
        raise ValueError(
            f"per-class FID needs >= 2 samples per class on both sides; (gen, ref) counts: {short}"
        )
    out = {}
    for c in classes:
        mu_g, sigma_g = gaussian_stats(gen.features[gen_labels == c])
        mu_r, sigma_r = gaussian_stats(ref.features[ref_labels == c])
        out[c] = _frechet(mu_g, sigma_g, mu_r, sigma_r)
    return out


def inception_score(
    gen: Features,
    splits: int = 1,  # disjoint groups the score is computed over; the std is over groups (0 for one)
    *,
    seed: int = 0,  # torchmetrics shuffles the samples before splitting
) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from the logits (Salimans et al. 2016) -> (mean, std) over splits.

    torchmetrics.image.inception.InceptionScore computes it, fed the logits through an identity module.
    """
    from torchmetrics.image.inception import InceptionScore

    if gen.logits is None:
        raise ValueError("inception_score needs logits; these Features have none")
    if not 1 <= splits <= len(gen):
        raise ValueError(f"splits must lie in [1, {len(gen)}] (the sample count), got {splits}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # sync_on_compute=False: under torchrun, torchmetrics would otherwise concatenate every process's
        # copy of the (already gathered) logits; the numbers must not depend on the number of processes
        metric = InceptionScore(feature=nn.Identity(), splits=splits, sync_on_compute=False)
    metric.update(gen.logits.double())  # float64 so that confident softmaxes do not underflow to 0
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else 0.0


def kid(
    gen: Features,
    ref: ReferenceStats,
    *,
    subsets: int = 100,  # random subsets the MMD is averaged over
    subset_size: int = 1000,  # samples per subset from each side; clipped to min(n_gen, n_ref)
    seed: int = 0,  # subset draws
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) -> (mean, std) over subsets.

    Unbiased MMD² with the kernel (x·y / D + 1)³, by torchmetrics.image.kid.KernelInceptionDistance fed the
    features (float64) through an identity module; subsets have equal size on both sides, so n_gen != n_ref
    is handled by subsampling the larger set.

    Its scale is the features' cubed: on Inception pool3 features published raw values are of order 10⁻³
    (hence the ×10³ of METRICS' `kid_x1e3`); the evaluation classifier's features are larger (mean x·y / D
    ≈ 8 on the digits test set), so KID on them is far larger and compares only within one metric
    fingerprint. Unbiased: a value below 0 is an estimate within its noise (the std) of no difference.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    check_pair(gen, ref)
    m = min(subset_size, len(gen), ref.n)
    if m < 2 or subsets < 1:
        raise ValueError(
            f"KID needs subset_size >= 2 and subsets >= 1, got {m} (after clipping) and {subsets}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=nn.Identity(),
            subsets=subsets,
            subset_size=m,
            sync_on_compute=False,  # see inception_score
        ).to(device)
    metric.update(ref.features.to(device, torch.float64), real=True)
    metric.update(gen.features.to(device, torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # compute() draws subsets with torch.randperm on the CPU generator
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(
    gen: Features,
    ref: ReferenceStats,
    *,
    k: int = 3,  # neighbourhood size of the k-NN manifold estimate
    batch_size: int = 1000,  # rows of each distance block (memory ~ batch_size x N x 8 bytes)
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) -> (precision, recall).

    Each set's manifold is the union of balls reaching every sample's k-th nearest neighbour in its own set
    (itself excluded); precision is the fraction of generated samples inside the real manifold, recall the
    fraction of real samples inside the generated one ("<=" at the radius). The arithmetic is
    torch_fidelity.metric_prc.calculate_precision_recall_part's (blockwise torch.cdist, kthvalue, float64), done
    on `device` throughout: torch-fidelity copies every distance block to the host and takes the k-th values
    there, which made this metric the slowest part of evaluation on a GPU. `tests/test_metrics.py` checks both
    give the same numbers.
    """
    check_pair(gen, ref)
    if not 1 <= k < min(len(gen), ref.n):
        raise ValueError(
            f"k must lie in [1, {min(len(gen), ref.n) - 1}] (smaller than both set sizes), got {k}"
        )
    fake = gen.features.to(device, torch.float64)
    real = ref.features.to(device, torch.float64)

    def radii(x: Tensor) -> Tensor:  # distance of each sample to its k-th nearest neighbour in x
        return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch_size)])

    def inside(q: Tensor, x: Tensor, r: Tensor) -> int:  # samples of q within some ball (x, r)
        return sum(int((torch.cdist(b, x) <= r).any(dim=1).sum()) for b in q.split(batch_size))

    precision = inside(fake, real, radii(real))
    recall = inside(real, fake, radii(fake))
    return precision / len(gen), recall / ref.n


def class_accuracy(
    gen_logits: Tensor,  # (N, num_classes) logits of the evaluation classifier on generated samples
    target_labels: Tensor,  # (N,) int64: the labels the samples were conditioned on
) -> float:
    """How often the classifier recognises a sample as the class it was generated for."""
    if gen_logits.dim() != 2 or target_labels.shape != (gen_logits.shape[0],):
        raise ValueError(
            f"need logits (N, K) and labels (N,), got {tuple(gen_logits.shape)} and {tuple(target_labels.shape)}"
        )
    return float((gen_logits.argmax(1).cpu() == target_labels.cpu()).double().mean())


# ---------------------------------------------------------------------------------------------------------
# The registry: what a cell records. Each entry turns a cell's features into named values (its columns);
# its options are its keyword-only arguments (params.yaml evaluate.metric_options.<name>).

# name -> metric(gen, ref, *, labels, class_logits, seed, device, **options) -> {column: value}
METRICS: Registry = Registry("metric", reserved=("labels", "class_logits", "seed", "device"))


@METRICS.register("fid")
def _fid_metric(gen: Features, ref: ReferenceStats, *, labels, class_logits, seed, device) -> dict:
    return {"fid": fid(gen, ref)}


@METRICS.register("is")
def _is_metric(gen: Features, ref: ReferenceStats, *, labels, class_logits, seed, device) -> dict:
    # one split, the whole cell: the IS of all n samples. Its spread comes from the disjoint seed ranges
    # (is_range_std, evaluate.seed_ranges), not from splits: the std over one split is 0, and IS over the
    # conventional 10 splits would change `is` itself (the mean of 10 scores of n/10 samples, biased low)
    mean, _ = inception_score(gen, 1, seed=seed)
    return {"is": mean}


# KID is reported x 10³, as the literature does (Bińkowski et al. 2018; StyleGAN-ADA, EDM): the column name says so
KID_SCALE = 1e3


@METRICS.register("kid")
def _kid_metric(
    gen: Features,
    ref: ReferenceStats,
    *,
    labels,
    class_logits,
    seed,
    device,
    subsets: int = 100,  # random subsets the MMD is averaged over
    subset_size: int = 1000,  # samples per subset and side (clipped to the sample counts)
) -> dict:
    mean, std = kid(gen, ref, subsets=subsets, subset_size=subset_size, seed=seed, device=device)
    return {"kid_x1e3": KID_SCALE * mean, "kid_x1e3_std": KID_SCALE * std}


@METRICS.register("precision_recall")
def _pr_metric(
    gen: Features,
    ref: ReferenceStats,
    *,
    labels,
    class_logits,
    seed,
    device,
    k: int = 3,  # neighbourhood of the k-NN manifolds
) -> dict:
    precision, recall = precision_recall(gen, ref, k=k, device=device)
    return {"precision": precision, "recall": recall}


@METRICS.register("class_acc")
def _class_acc_metric(gen: Features, ref: ReferenceStats, *, labels, class_logits, seed, device) -> dict:
    return {"class_acc": class_accuracy(class_logits, labels)}
