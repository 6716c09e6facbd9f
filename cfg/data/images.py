"""Images between the float range [-1, 1] the networks use and uint8 0..255, and uint8 tiles
(rows, cols, C, H, W) to one picture. Generated images are uint8 from the sampler to the metrics and MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cfg.io import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] to uint8 [0, 255], rounding to the nearest level (values outside are clipped);
    uint8 passes through."""
    if x.dtype == torch.uint8:
        return x
    # add() makes the one new float tensor; the rest works in place, as data sets reach 250 MB of floats
    return x.to(torch.float32).add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(u8: Tensor) -> Tensor:
    """uint8 images [0, 255] to float32 in [-1, 1] (`to_uint8` inverts it exactly); floats pass through as
    float32."""
    if u8.dtype != torch.uint8:
        return u8.to(torch.float32)
    return u8.to(torch.float32) / 127.5 - 1


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
    """Write `tile_grid(tiles)` as a PNG, atomically (`cfg.io.atomic_write`): a full disk or a kill leaves the
    previous grid or none, never a truncated one."""
    from PIL import Image

    arr = tile_grid(tiles, pad, upscale)
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def class_by_w_tiles(images: Tensor, labels: Tensor, num_classes: int, per_class: int = 1) -> Tensor:
    """From (W, N, C, H, W) samples, the first `per_class` examples of each class as rows, one column per w.

    Every column uses the same examples (the same noise), so a row shows one sample changing with w.
    """
    rows = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        rows.extend(images[:, i] for i in idx.tolist())  # each (W, C, H, W)
    return torch.stack(rows)  # (rows, W, C, H, W)
