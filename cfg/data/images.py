"""Image grids: uint8 tiles (rows, cols, C, H, W) to one picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def tile_grid(tiles: Tensor, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """(R, K, C, H, W) uint8 -> (R·(H+pad)+pad, K·(W+pad)+pad, C) uint8 with a white border between tiles."""
    r, k, c, h, w = tiles.shape
    arr = tiles.permute(0, 1, 3, 4, 2).numpy()  # (R, K, H, W, C)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=2).repeat(upscale, axis=3)
        h, w = h * upscale, w * upscale
    out = np.full((r * (h + pad) + pad, k * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(r):
        for j in range(k):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = arr[i, j]
    return out


def save_grid(path: str | Path, tiles: Tensor, pad: int = 1, upscale: int = 1) -> None:
    """Write `tile_grid(tiles)` as a PNG."""
    from PIL import Image

    arr = tile_grid(tiles, pad, upscale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def class_by_w_tiles(images: Tensor, labels: Tensor, num_classes: int, per_class: int = 1) -> Tensor:
    """From (W, N, C, H, W) samples, the first `per_class` examples of each class as rows, one column per w.

    Every column uses the same examples (the same noise), so a row shows one sample changing with w.
    """
    rows = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        rows.extend(images[:, i] for i in idx.tolist())  # each (W, C, H, W)
    return torch.stack(rows)  # (rows, W, C, H, W)
