"""The standard FID Inception-v3: the TensorFlow graph inception-2015-12-05 of the original FID / IS code.

Published FIDs use this network; here it is torch-fidelity's port, `FeatureExtractorInceptionV3`
(torch_fidelity/feature_extractor_inceptionv3.py, torch-fidelity 0.4), with its weights
`weights-inception-2015-12-05-6726825d.pth`. pytorch-fid publishes the same converted graph as
`pt_inception-2015-12-05-6726825d.pth`: the parameter names are the same (torchvision's Inception3 without the
auxiliary head) and so is the sha256 prefix in the file name, so either file works.

What torch-fidelity's forward does, read from its source:

1. It accepts only uint8 tensors (B, 3, H, W) with values 0..255 (it raises otherwise), and casts them to
   float32 (its `feature_extractor_internal_dtype`).
2. It resizes to 299x299 with `interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299),
   align_corners=False)`, method "slow": TensorFlow 1.x `tf.image.resize_bilinear` with align_corners=False,
   the resize inside the original FID graph. The source coordinate of output pixel i is i * (in / out), with
   no half-pixel offset (PyTorch's `F.interpolate(..., align_corners=False)` uses (i + 0.5) * in / out - 0.5),
   the two neighbours floor and floor + 1 clamped to the last row/column, no antialiasing. torch-fidelity
   states it is bit-exact with TF on CPU; a 16x16 image is upsampled, so antialiasing would not matter anyway.
3. It scales to [-1, 1] by (x - 128) / 128 (as the graph's Sub/Mul), runs Inception-v3 with the FID-specific
   patches (average pools that exclude padding; max pool in the last block's pool branch), and average-pools
   to the 2048-dimensional pool3 features.
4. "logits_unbiased" is pool3 @ fc.weight.T without the bias, over 1008 classes: the quantity the original
   Inception Score code (Salimans et al. 2016) and torch-fidelity / torchmetrics use for IS.

torchmetrics' own `FrechetInceptionDistance(feature=2048)` wraps the same network but by default
(antialias=True) resizes with `F.interpolate(mode="bilinear", antialias=True)` instead, so its numbers differ
slightly from TF / torch-fidelity FIDs; `cfg.eval.metrics` therefore calls torch-fidelity's network directly.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

# file name and URL of torch-fidelity's copy; pytorch-fid's is named pt_inception-2015-12-05-6726825d.pth
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name ends in its sha256's first 8 hex
FEATURES = ("2048", "logits_unbiased")  # pool3 features (B, 2048) and IS logits (B, 1008)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(weights_path: str | Path | None, device: torch.device | str = "cpu") -> nn.Module:
    """torch-fidelity's FID Inception-v3 in eval mode on `device`, returning (pool3 (B, 2048), logits (B, 1008)).

    weights_path: a local copy of the inception-2015-12-05 weights; None lets torch-fidelity download them
    to the torch hub cache (needs internet). Input: uint8 (B, 3, H, W); see the module docstring.
    Warns when the file is not the published one, whose FIDs are comparable with papers'.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights_path is not None:
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {str(weights_path)!r}. Download "
                f"pt_inception-2015-12-05-6726825d.pth ({PYTORCH_FID_URL}) or torch-fidelity's copy "
                f"{WEIGHTS_FILENAME} ({WEIGHTS_URL}) on a machine with internet and copy it there, or pass "
                f"weights_path=None to let torch-fidelity download it."
            )
        # torch-fidelity unpickles with weights_only=False; refuse anything that is not plain tensors first
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{str(weights_path)!r} is not a plain PyTorch state_dict file: {e}") from e
        digest = _file_sha256(weights_path)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{str(weights_path)!r} has sha256 {digest[:16]}..., not the published inception-2015-12-05 "
                f"weights ({WEIGHTS_SHA256_PREFIX}...): FIDs computed with it are not comparable with papers'",
                stacklevel=2,
            )
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            list(FEATURES),
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
    except URLError as e:
        raise RuntimeError(
            f"could not download the Inception weights ({e}); on a machine without internet download "
            f"{WEIGHTS_URL} elsewhere and pass its path as weights_path"
        ) from e
    return net.to(device).eval()
