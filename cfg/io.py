"""Atomic file writes: every output of cfg-lab is written to a temporary file, fsynced and renamed, so a
crash, a kill or a full disk leaves the old file or none, never a truncated one; and checked reads: a file
that is truncated or whose bytes changed after it was written is refused, naming it and its stage."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any stage thread exists
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception, if any: torch.save reports a failed write as a RuntimeError of its
    zip writer ("unexpected pos ...") whose context is the OSError (e.g. ENOSPC, EFBIG) that caused it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_failed(path: Path, e: BaseException, existed: bool) -> OSError | None:
    """An OSError naming `path`, the cause and what is left, for a write that failed on the file system."""
    cause = _os_error(e)
    if cause is None:
        return None
    name = errno.errorcode.get(cause.errno, str(cause.errno))
    kept = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    hint = ""
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"; free space on the file system of {path.parent} and run the stage again"
    elif cause.errno == errno.EFBIG:
        hint = "; raise the file-size limit (ulimit -f) and run the stage again"
    return OSError(cause.errno, f"could not write {path}: {cause.strerror} ({name}); {kept}{hint}")


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it and rename it over `path`: a crash or a
    full disk leaves the old file or none, never a half-written one, and no temporary file behind. A failure
    of the file system (a full disk, a file-size limit, no permission) raises an OSError that names `path`,
    the cause and what is left."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        failed = _write_failed(path, e, existed)
        if failed is None:
            raise
        raise failed from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the mode open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        failed = _write_failed(path, e, existed)
        if failed is None:
            raise
        raise failed from e
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


def _check_zip(path: Path) -> None:
    """Read every member of a torch.save file (a zip archive) through zipfile, which checks each member's
    CRC-32: torch.load does not, so a flipped byte in a tensor would load as a silently wrong value. Raises
    zipfile.BadZipFile naming the member whose bytes changed; a truncated file has no central directory."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as f:
                while f.read(1 << 24):
                    pass


def load(path: str | Path, *, what: str, rerun: str, map_location: Any = "cpu") -> Any:
    """`torch.load` (weights only) of a file cfg-lab wrote, after checking its bytes (`_check_zip`), with errors
    that name the file, what it should hold and how to make it again (`rerun`, e.g. "dvc repro train@0.1";
    a `<p_uncond>` in it is filled from a `p_uncond=<p>` folder of the path), instead of a bare unpickling
    error or a silently corrupt value."""
    import torch

    path = Path(path)
    folder = next((p.name for p in path.parents if re.fullmatch(r"p_uncond=[^/]+", p.name)), None)
    if folder is not None:
        rerun = rerun.replace("<p_uncond>", folder.removeprefix("p_uncond="))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} there; make it with `{rerun}`")
    try:
        _check_zip(path)
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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's exponent floats: `1e-4` and `2E5` are numbers, as DVC (ruamel.yaml)
    and Hydra's `-S` read them; YAML 1.1, PyYAML's own, wants a dot and read them as strings. The rest stays
    YAML 1.1 (`on`, `yes` are booleans, `017` is octal, `1:30` sexagesimal), where ruamel reads strings and 17:
    `cfg.study.presets.dvc_applied` refuses an override that DVC would write as such a value."""


_Yaml12Loader.add_implicit_resolver(  # after the int resolver: 10 stays an int
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML text, numbers as DVC reads params.yaml: PyYAML's safe loader with YAML 1.2's exponent floats
    (`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
