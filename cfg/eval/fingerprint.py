"""Fingerprints: which metric values may be compared.

A `Fingerprint` holds everything a metric value depends on besides the samples (extractor, its weights, the
reference set, the sample count, resolution, resize); `check_comparable` refuses mixed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cfg.eval.features import Features
    from cfg.eval.stats import ReferenceStats


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
    check_pair(gen, ref)
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


def check_pair(gen: Features, ref: ReferenceStats) -> None:
    if gen.features.dim() != 2 or gen.features.shape[1] != ref.features.shape[1]:
        raise ValueError(
            f"generated features {tuple(gen.features.shape)} do not match reference dimension {ref.features.shape[1]}"
        )
    if gen.resolution and ref.resolution and gen.resolution != ref.resolution:
        # Inception resizes both to 299 and would score them, but a FID of images of another size than the
        # reference's measures the resizing, not the model (0: a reference written before the side was kept)
        raise FingerprintMismatch(
            f"generated images are {gen.resolution} pixels a side, the reference's {ref.resolution}: score samples "
            "of the reference's size (data.image_size)",
            ["resolution"],
        )
    if gen.weights_hash and ref.weights_hash and gen.weights_hash != ref.weights_hash:
        raise FingerprintMismatch(
            f"generated features come from {gen.extractor_name} weights {gen.weights_hash}, the reference from "
            f"{ref.extractor_name} weights {ref.weights_hash}",
            ["weights_hash"],
        )
