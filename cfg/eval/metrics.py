"""Sample-quality metrics in three steps: features from images, statistics from features, distances.

1. `extract_features(extractor, images)` -> `Features` (N, D) and logits (N, K), with the extractor's
   identity (name, weights hash, resize) and the image resolution attached.
2. `reference_stats(features)` -> `ReferenceStats`: mean, covariance and the features themselves (KID and
   precision / recall need samples, not moments) of the real data; `save_reference_stats` /
   `load_reference_stats` store them.
3. Distances from generated features and reference statistics: `fid`, `kid`, `precision_recall`,
   `per_class_fid`; and from generated logits alone: `inception_score`, `class_accuracy`.

The maths is torchmetrics' and torch-fidelity's wherever they implement it (each function names the routine);
this module feeds them precomputed features in float64. Two extractors: the small evaluation `Classifier` at
the data's native resolution (the default) and the standard FID Inception-v3 (`cfg.nets.inception`). A
`Fingerprint` (extractor, weights, reference set, sample count, resolution, resize) says which numbers may be
compared; `check_comparable` refuses the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from cfg.nets.classifier import Classifier

# the numeric metrics of one (p_uncond, w) cell: its MLflow metrics and the metric columns of tradeoff.csv
CELL_METRICS = (
    "fid",
    "is",
    "is_std",
    "kid",
    "kid_std",
    "precision",
    "recall",
    "class_acc",
    "fid_range_mean",
    "fid_range_std",
    "is_range_mean",
    "is_range_std",
)

# ---------------------------------------------------------------------------------------------------------
# Step 1: features from images


def _to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 0..255, rounding to the nearest level; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.to(torch.float32).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _to_float(images: Tensor) -> Tensor:
    """uint8 0..255 to float32 [-1, 1]; floats pass through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    return images.to(torch.float32)


def _hash_tensor(h: hashlib._Hash, t: Tensor) -> None:
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def state_dict_hash(module: nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes and bytes, in name order); first 16 hex."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()[:16]


class FeatureExtractor(nn.Module):
    """A network seen uniformly: images -> {"features": (B, feature_dim), "logits": (B, num_logits)}.

    Images are (B, C, H, W), float in [-1, 1] or uint8 0..255; each subclass converts them to what its
    network takes. Build with `classifier_extractor` or `inception_extractor`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,  # extractor family, e.g. "classifier" or "inception-v3-tf-2015-12-05"
        resize: str,  # how images reach the network's input size, for fingerprints
        input_size: int,  # the network's input side, pixels
        feature_dim: int,  # D
        num_logits: int,  # K
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.weights_hash = state_dict_hash(net)
        self.resize = resize
        self.input_size = input_size
        self.feature_dim = feature_dim
        self.num_logits = num_logits

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # BatchNorm statistics and dropout stay frozen

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class _ClassifierExtractor(FeatureExtractor):
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c, s = self.net.config.in_channels, self.net.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(
                f"the classifier takes images (B, {c}, {s}, {s}) without resizing, got {tuple(images.shape)}"
            )
        features = self.net.features(_to_float(images))  # (B, D)
        return {"features": features, "logits": self.net.head(features)}


class _InceptionExtractor(FeatureExtractor):
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = _to_uint8(images).expand(-1, 3, -1, -1)  # grayscale -> RGB by repeating the channel
        features, logits = self.net(x)  # (B, 2048), (B, 1008)
        return {"features": features, "logits": logits}


def classifier_extractor(model: Classifier) -> FeatureExtractor:
    """The evaluation classifier's penultimate activations and logits, at the data's native resolution."""
    s = model.config.image_size
    return _ClassifierExtractor(
        model,
        name="classifier",
        resize=f"none (native {s}x{s})",
        input_size=s,
        feature_dim=model.config.feature_dim,
        num_logits=model.config.num_classes,
    )


def extractor_by_name(
    name: str,  # evaluate.extractor: "classifier" or "inception"
    classifier_path: str | Path,
    inception_weights: str | Path | None,  # a local weights file; None: torch-fidelity's download
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """The feature extractor named by evaluate.extractor: the pipeline's classifier or FID Inception-v3."""
    if name == "inception":
        return inception_extractor(inception_weights, device=device)
    from cfg.nets.classifier import load_classifier

    model, _ = load_classifier(classifier_path, map_location=device)
    return classifier_extractor(model)


def inception_extractor(
    weights_path: str | Path | None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """The standard FID Inception-v3: pool3 features (2048) and bias-free IS logits (1008); see cfg.nets.inception."""
    from cfg.nets.inception import load_inception

    return _InceptionExtractor(
        load_inception(weights_path, device),
        name="inception-v3-tf-2015-12-05",
        resize="bilinear to 299x299 (torch-fidelity, TF-compatible)",
        input_size=299,
        feature_dim=2048,
        num_logits=1008,
    )


@dataclass
class Features:
    """Features of one image set, with where they came from."""

    features: Tensor  # (N, D) on the CPU; float32 from extract_features
    logits: Tensor | None = None  # (N, K) on the CPU
    extractor_name: str = ""  # FeatureExtractor.name, "" when unknown
    weights_hash: str = ""  # FeatureExtractor.weights_hash, "" when unknown
    resize: str = ""  # FeatureExtractor.resize
    resolution: int = 0  # side of the images the features came from, pixels

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, mask: Tensor) -> Features:
        """The rows where the boolean `mask` (N,) is true, with the same provenance."""
        logits = None if self.logits is None else self.logits[mask]
        return dataclasses.replace(self, features=self.features[mask], logits=logits)


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    images: Tensor,  # (N, C, H, W) float in [-1, 1] or uint8 0..255
    *,
    batch_size: int = 500,  # images per forward pass
    device: torch.device | str = "cpu",  # where the extractor runs; it is moved there
) -> Features:
    """Features and logits of `images`, returned float32 on the CPU."""
    if images.dim() != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(
            f"images must be (N, C, H, W) uint8 or float, got {images.dtype} {tuple(images.shape)}"
        )
    extractor.eval().to(device)
    feats, logits = [], []
    for batch in images.split(batch_size):
        out = extractor(batch.to(device))
        feats.append(out["features"].float().cpu())
        logits.append(out["logits"].float().cpu())
    return Features(
        features=torch.cat(feats),
        logits=torch.cat(logits),
        extractor_name=extractor.name,
        weights_hash=extractor.weights_hash,
        resize=extractor.resize,
        resolution=images.shape[-2],
    )


# ---------------------------------------------------------------------------------------------------------
# Step 2: statistics from features


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) in float64, as torchmetrics' FID and np.cov in the TF code."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T)


@dataclass
class ReferenceStats:
    """Statistics of the real data's features for one extractor."""

    mu: Tensor  # (D,) float64 mean
    sigma: Tensor  # (D, D) float64 unbiased covariance
    features: Tensor  # (N, D) as extracted (float32): KID and precision / recall need the samples
    n: int  # N
    extractor_name: str
    weights_hash: str
    hash: str  # sha256 of every other field, first 16 hex: the reference set's identity in fingerprints
    labels: Tensor | None = None  # (N,) int64 class labels, needed by per_class_fid
    resize: str = ""
    resolution: int = 0  # side of the real images, pixels


def _stats_hash(stats: ReferenceStats) -> str:
    h = hashlib.sha256()
    for f in fields(stats):
        value = getattr(stats, f.name)
        if f.name == "hash":
            continue
        h.update(f.name.encode())
        if isinstance(value, Tensor):
            _hash_tensor(h, value)
        else:
            h.update(json.dumps(value).encode())
    return h.hexdigest()[:16]


def reference_stats(
    features: Features,
    extractor: FeatureExtractor | None = None,  # its name / hash are recorded; default: those in `features`
    *,
    labels: Tensor | None = None,  # (N,) int64 class labels of the real images, for per_class_fid
) -> ReferenceStats:
    """Mean, covariance and features of real data, identified by a content hash."""
    if extractor is not None and features.weights_hash and features.weights_hash != extractor.weights_hash:
        raise FingerprintMismatch(
            f"features came from weights {features.weights_hash}, the extractor has {extractor.weights_hash}",
            ["weights_hash"],
        )
    if labels is not None and (labels.shape != (len(features),) or labels.dtype != torch.int64):
        raise ValueError(
            f"labels must be int64 of shape ({len(features)},), got {labels.dtype} {tuple(labels.shape)}"
        )
    mu, sigma = gaussian_stats(features.features)
    stats = ReferenceStats(
        mu=mu,
        sigma=sigma,
        features=features.features.cpu(),
        n=len(features),
        extractor_name=extractor.name if extractor is not None else features.extractor_name,
        weights_hash=extractor.weights_hash if extractor is not None else features.weights_hash,
        hash="",
        labels=None if labels is None else labels.cpu(),
        resize=extractor.resize if extractor is not None else features.resize,
        resolution=features.resolution,
    )
    stats.hash = _stats_hash(stats)
    return stats


def save_reference_stats(path: str | Path, stats: ReferenceStats) -> None:
    """Write `stats` as a torch file of tensors and plain values."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({f.name: getattr(stats, f.name) for f in fields(stats)}, Path(path))


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """Read a `save_reference_stats` file (weights_only unpickling) and check its content hash."""
    stats = ReferenceStats(**torch.load(Path(path), map_location="cpu", weights_only=True))
    if _stats_hash(stats) != stats.hash:
        raise ValueError(
            f"{str(path)!r}: contents do not match the stored hash {stats.hash} (file edited or corrupt)"
        )
    return stats


# ---------------------------------------------------------------------------------------------------------
# Step 3: distances


def _check_pair(gen: Features, ref: ReferenceStats) -> None:
    if gen.features.dim() != 2 or gen.features.shape[1] != ref.features.shape[1]:
        raise ValueError(
            f"generated features {tuple(gen.features.shape)} do not match reference dimension {ref.features.shape[1]}"
        )
    if gen.weights_hash and ref.weights_hash and gen.weights_hash != ref.weights_hash:
        raise FingerprintMismatch(
            f"generated features come from {gen.extractor_name} weights {gen.weights_hash}, the reference from "
            f"{ref.extractor_name} weights {ref.weights_hash}",
            ["weights_hash"],
        )


def _frechet(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    from torchmetrics.image.fid import _compute_fid

    # ||mu1 - mu2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½): torchmetrics.image.fid._compute_fid, which takes the trace
    # of the square root as the sum of sqrt(eigvals(Σ1 Σ2)) (torch.linalg.eigvals), here in float64
    return float(_compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double()))


def fid(gen: Features, ref: ReferenceStats) -> float:
    """Fréchet distance between Gaussians fitted to generated and reference features (Heusel et al. 2017)."""
    _check_pair(gen, ref)
    mu, sigma = gaussian_stats(gen.features)
    return _frechet(mu, sigma, ref.mu, ref.sigma)


def per_class_fid(
    gen: Features,
    gen_labels: Tensor,  # (N_gen,) int64: the class each sample was conditioned on
    ref: ReferenceStats,
    ref_labels: Tensor | None = None,  # (N_ref,) int64; default: ref.labels
) -> dict[int, float]:
    """FID between generated and real features of each class in `gen_labels`."""
    _check_pair(gen, ref)
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
        metric = InceptionScore(feature=nn.Identity(), splits=splits)
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
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(gen, ref)
    m = min(subset_size, len(gen), ref.n)
    if m < 2 or subsets < 1:
        raise ValueError(
            f"KID needs subset_size >= 2 and subsets >= 1, got {m} (after clipping) and {subsets}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=m).to(device)
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

    Each set's manifold is the union of balls reaching every sample's k-th nearest neighbour in its own set;
    precision is the fraction of generated samples inside the real manifold, recall the fraction of real
    samples inside the generated one. torch_fidelity.metric_prc.prc_features_to_metric computes it
    (blockwise torch.cdist, "<=" at the radius), on float64 features.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    _check_pair(gen, ref)
    if not 1 <= k < min(len(gen), ref.n):
        raise ValueError(
            f"k must lie in [1, {min(len(gen), ref.n) - 1}] (smaller than both set sizes), got {k}"
        )
    out = prc_features_to_metric(
        gen.features.to(device, torch.float64),
        ref.features.to(device, torch.float64),
        prc_neighborhood=k,
        prc_batch_size=batch_size,
        save_cpu_ram=True,  # blockwise: never holds the full N_gen x N_ref distance matrix
        verbose=False,
    )
    # torch-fidelity averages in float32; both are counts over n, so snap back to the exact fractions
    return round(out["precision"] * len(gen)) / len(gen), round(out["recall"] * ref.n) / ref.n


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
# Fingerprints: which numbers may be compared


class FingerprintMismatch(ValueError):
    """Metrics computed under different settings; `fields` lists what differs."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


@dataclass(frozen=True)
class Fingerprint:
    """Everything a metric value depends on besides the samples themselves."""

    extractor: str  # FeatureExtractor.name
    weights_hash: str  # FeatureExtractor.weights_hash
    reference_hash: str  # ReferenceStats.hash
    n_samples: int  # generated samples the metric used (FID is biased in n)
    resolution: int  # side of the generated images, pixels
    resize: str  # how images reached the extractor's input size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"fingerprint dict lacks {missing}; got keys {sorted(d)}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def key(self) -> str:
        """Short stable hash of the fields: equal keys <=> comparable numbers."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def fingerprint(gen: Features, ref: ReferenceStats) -> Fingerprint:
    """The fingerprint of metrics computed from `gen` against `ref`."""
    _check_pair(gen, ref)
    return Fingerprint(
        extractor=gen.extractor_name or ref.extractor_name,
        weights_hash=gen.weights_hash or ref.weights_hash,
        reference_hash=ref.hash,
        n_samples=len(gen),
        resolution=gen.resolution,
        resize=gen.resize or ref.resize,
    )


def check_comparable(fingerprints: Iterable[Fingerprint | dict | str]) -> None:
    """Raise FingerprintMismatch naming each differing field (and its values) unless all fingerprints agree.

    Strings are a JSON fingerprint dict or a bare `key()`; with any bare key only keys can be compared,
    and a mismatch names the field "key".
    """
    items: list[Fingerprint | str] = []
    for fp in fingerprints:
        if isinstance(fp, str) and fp.lstrip().startswith("{"):
            fp = json.loads(fp)
        items.append(Fingerprint.from_dict(fp) if isinstance(fp, dict) else fp)
    if any(isinstance(fp, str) for fp in items):
        keys = sorted({fp if isinstance(fp, str) else fp.key() for fp in items})
        if len(keys) > 1:
            raise FingerprintMismatch(f"metrics are not comparable: fingerprint keys differ {keys}", ["key"])
        return
    differing = {}
    for f in fields(Fingerprint):
        values = list(dict.fromkeys(getattr(fp, f.name) for fp in items))
        if len(values) > 1:
            differing[f.name] = values
    if differing:
        detail = "; ".join(f"{name} differs: {values}" for name, values in differing.items())
        raise FingerprintMismatch(f"metrics are not comparable: {detail}", list(differing))


# ---------------------------------------------------------------------------------------------------------


def evaluate_cell(
    gen: Features,
    gen_labels: Tensor,  # (N,) int64: the labels the samples were conditioned on
    ref: ReferenceStats,
    *,
    class_logits: Tensor
    | None,  # (N, classes) evaluation-classifier logits; gen.logits for classifier features
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,  # precision / recall neighbourhood
    is_splits: int = 1,
    seed: int = 0,  # KID subsets and IS shuffling
    device: torch.device | str = "cpu",  # where KID and precision / recall run
) -> dict:
    """All metrics of one set of generated samples against `ref`, with their fingerprint key.

    Returns {"fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "class_acc", "n_samples",
    "fingerprint"}; class_acc is None without class_logits.
    """
    fp = fingerprint(gen, ref)
    is_mean, is_std = inception_score(gen, is_splits, seed=seed)
    kid_mean, kid_std = kid(
        gen, ref, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, device=device
    )
    precision, recall = precision_recall(gen, ref, k=k, device=device)
    return {
        "fid": fid(gen, ref),
        "is": is_mean,
        "is_std": is_std,
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "class_acc": None if class_logits is None else class_accuracy(class_logits, gen_labels),
        "n_samples": len(gen),
        "fingerprint": fp.key(),
    }
