"""Step 2 of the metrics: statistics of the real data's features, stored once per extractor."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from cfg.eval.features import FeatureExtractor, Features
from cfg.eval.fingerprint import FingerprintMismatch
from cfg.io import atomic_save, load
from cfg.nets.hashing import hash_tensor


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) in float64, as torchmetrics' FID and np.cov in the TF code."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])  # torch.cov gives a 0-d tensor for D = 1


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
            hash_tensor(h, value)
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
    atomic_save({f.name: getattr(stats, f.name) for f in fields(stats)}, Path(path))


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """Read a `save_reference_stats` file (weights_only unpickling) and check its content hash."""
    stats = ReferenceStats(**load(path, what="reference statistics file", rerun="dvc repro reference"))
    if _stats_hash(stats) != stats.hash:
        raise ValueError(
            f"{str(path)!r}: contents do not match the stored hash {stats.hash} (file edited or corrupt)"
        )
    return stats
