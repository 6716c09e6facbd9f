"""Atomic file writes: every output of cfg-lab is written to a temporary file, fsynced and renamed, so a
crash, a kill or a full disk leaves the old file or none, never a truncated one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any stage thread exists
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it and rename it over `path`: a crash or a
    full disk leaves the old file or none, never a half-written one, and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the mode open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of a text."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def load(path: str | Path, *, what: str, rerun: str, map_location: Any = "cpu") -> Any:
    """`torch.load` (weights only) of a file cfg-lab wrote, with errors that name the file, what it should
    hold and how to make it again (`rerun`, e.g. "dvc repro train@0.1"), instead of a bare unpickling error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} there; make it with `{rerun}`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:200]}): the file is truncated or "
            f"corrupt; make it again with `{rerun}`"
        ) from e


def tensors_sha256(tensors: dict) -> str:
    """sha256 of a name -> tensor dict (names, dtypes, shapes and bytes, in name order): a checkpoint's content
    hash, stored beside it and verified on load."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_csv(path: str | Path, rows: list[dict], fieldnames: list[str]) -> None:
    """`atomic_write` of a CSV with these columns (keys of a row outside them are left out)."""
    import csv

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, mode="w")
