"""Degenerate results: cells whose numbers say nothing about guidance, flagged instead of tabulated silently.

A model whose EMA still holds its initial weights gives FID ~1000 and IS ~1 in every cell; nothing else in a
trade-off table says so. Two baselines measured with the same extractor, reference and sample count expose it:

- **near chance**: at w >= 0 the samples are conditioned on their labels, so the evaluation classifier should
  recognise them. A cell is near chance when `class_acc < chance + max(ACC_MARGIN * (1 - chance), 3 σ)`,
  with `chance` the accuracy of always guessing the most common conditioned class (1/K for balanced labels)
  and σ = sqrt(chance (1 - chance) / n) its binomial spread over n samples. For 10 classes: class_acc < 0.325.
  (w = -1 is unconditional sampling: its class_acc is chance by design and is not checked.)
- **no better than noise**: `fid >= NOISE_FID_FRACTION * noise_fid`, where `noise_fid` is the FID of n images
  of uniform pixel noise (`noise_fid`). On the embedded default (digits, the classifier extractor, n = 400)
  noise scores ~1370, an untrained U-Net ~1650 and the worst cell of a trained model 65.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cfg.eval.features import FeatureExtractor, extract_features
from cfg.eval.metrics import fid
from cfg.eval.stats import ReferenceStats
from cfg.study.records import CellRecord, guidance_name

ACC_MARGIN = 0.25  # near chance: less than this fraction of the way from chance to perfect accuracy
ACC_SIGMAS = 3.0  # ... or within this many binomial standard deviations of chance
NOISE_FID_FRACTION = 0.5  # no better than noise: FID at least this fraction of the noise images' FID


def chance_accuracy(labels: Tensor) -> float:
    """Class accuracy of a classifier that ignores the image: always the most common of `labels` (N,)."""
    return float(torch.bincount(labels.cpu()).max()) / len(labels)


def accuracy_floor(chance: float, n: int) -> float:
    """The class accuracy below which n samples are near chance (module docstring)."""
    return chance + max(ACC_MARGIN * (1 - chance), ACC_SIGMAS * math.sqrt(chance * (1 - chance) / n))


def noise_images(n: int, image_shape: tuple[int, int, int], *, seed: int = 0) -> Tensor:
    """n images (n, C, H, W) uint8 of independent uniform pixels: the no-model baseline."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *image_shape), generator=gen, dtype=torch.uint8)


def noise_fid(
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    n_samples: int,  # as many images as a cell has: FID is biased in n
    image_shape: tuple[int, int, int],  # (C, H, W) of the generated images
    *,
    seed: int = 0,  # of the noise
    batch_size: int = 500,  # images per extractor batch
    device: torch.device | str = "cpu",
) -> float:
    """FID of uniform-noise images through `extractor` against `reference`: what no model at all scores."""
    images = noise_images(n_samples, image_shape, seed=seed)
    return fid(extract_features(extractor, images, batch_size=batch_size, device=device), reference)


def degenerate_cells(records: list[CellRecord]) -> list[dict]:
    """The cells near chance or no better than noise (module docstring), as {"p_uncond", "w", "guidance",
    "reasons"} in record order (guidance: `guidance_name`, the method with its options); a check whose inputs a
    record lacks (no class_acc metric, no noise FID) is skipped."""
    flagged = []
    for r in records:
        reasons = []
        acc = r.metrics.get("class_acc")
        if r.w >= 0 and acc is not None and r.chance_acc is not None:
            floor = accuracy_floor(r.chance_acc, r.n_samples)
            if acc < floor:
                reasons.append(f"class_acc {acc:.3f} < {floor:.3f}: near chance ({r.chance_acc:.3f})")
        f = r.metrics.get("fid")
        if f is not None and r.noise_fid is not None and f >= NOISE_FID_FRACTION * r.noise_fid:
            reasons.append(
                f"FID {f:.1f} >= {NOISE_FID_FRACTION:g} x noise FID {r.noise_fid:.1f}: no better than noise"
            )
        if reasons:
            method = guidance_name(r.guidance, r.guidance_options)
            flagged.append({"p_uncond": r.p_uncond, "w": r.w, "guidance": method, "reasons": reasons})
    return flagged


def describe(flagged: list[dict], n_cells: int) -> list[str]:
    """One warning line for the set and one per flagged cell: what `evaluate` and `report` print."""
    if not flagged:
        return []
    head = (
        f"{len(flagged)} of {n_cells} cells are degenerate (near chance or no better than noise): their "
        "FID / IS say nothing about guidance; is the model trained (steps, EMA)?"
    )
    return [head] + [f"{_cell(c)}: {'; '.join(c['reasons'])}" for c in flagged]


def _cell(c: dict) -> str:
    # `p_uncond=0.2 w=4`, then the guidance method unless it is the paper's cfg (as cell run names)
    method = c.get("guidance", "cfg")
    return f"p_uncond={c['p_uncond']:g} w={c['w']:g}" + ("" if method == "cfg" else f" {method}")
