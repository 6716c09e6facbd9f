"""Step 1 of the metrics: features from images.

A `FeatureExtractor` sees a network uniformly: uint8 images (B, C, H, W) -> features (B, D) and logits (B, K).
`EXTRACTORS` names them (params.yaml `evaluate.extractor`): the pipeline's evaluation classifier at the data's
native resolution (the default) and the standard FID Inception-v3 (`cfg.nets.inception`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cfg.data.images import from_uint8, to_uint8
from cfg.nets.classifier import Classifier
from cfg.nets.hashing import state_dict_hash
from cfg.registry import Registry


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
        features = self.net.features(from_uint8(images))  # (B, D)
        return {"features": features, "logits": self.net.head(features)}


class _InceptionExtractor(FeatureExtractor):
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = to_uint8(images).expand(-1, 3, -1, -1)  # grayscale -> RGB by repeating the channel
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


# name -> loader(*, classifier_path, inception_weights, device) -> FeatureExtractor (params.yaml evaluate.extractor)
EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry(
    "feature extractor", reserved=("classifier_path", "inception_weights", "device")
)


@EXTRACTORS.register("classifier")
def _load_classifier_extractor(
    *, classifier_path: str | Path, inception_weights: str | Path | None, device: torch.device | str
) -> FeatureExtractor:
    """The pipeline's evaluation classifier (models/classifier.pt)."""
    from cfg.nets.classifier import load_classifier

    return classifier_extractor(load_classifier(classifier_path, map_location=device)[0])


@EXTRACTORS.register("inception")
def _load_inception_extractor(
    *, classifier_path: str | Path, inception_weights: str | Path | None, device: torch.device | str
) -> FeatureExtractor:
    """FID Inception-v3 from a local weights file (None: torch-fidelity's download)."""
    return inception_extractor(inception_weights, device=device)


def extractor_by_name(
    name: str,  # evaluate.extractor, an EXTRACTORS entry
    classifier_path: str | Path,
    inception_weights: str | Path | None,  # a local weights file; None: torch-fidelity's download
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """The feature extractor named by evaluate.extractor."""
    return EXTRACTORS[name](
        classifier_path=classifier_path, inception_weights=inception_weights, device=device
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
