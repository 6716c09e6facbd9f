"""Content hashes of tensors and networks: which weights a feature extractor or a sampled model had, whatever its
path, run or memory format."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def hash_tensor(h: hashlib._Hash, t: Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (in row-major order, whatever its memory format) to `h`."""
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def state_dict_hash(module: nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes and bytes, in name order); first 16 hex."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        hash_tensor(h, t)
    return h.hexdigest()[:16]
