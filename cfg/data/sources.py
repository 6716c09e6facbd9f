"""The files outside the repository that a study reads, hashed, so that DVC reruns what they feed when they change.

DVC hashes the files a stage lists as deps, all inside the workspace. The data (`data.root`, usually a shared folder
outside it, or scikit-learn's copy of the digits) and the Inception weights (`evaluate.inception_weights`) are named
by params only: replacing them at the same path (a corrected copy, another download) changed nothing DVC could see,
and `dvc repro` kept the old prepared data, models and metrics. Their paths cannot be deps themselves: `data.root`
is null for the digits, and a relative root is taken from the project root (`cfg.study.store.data_root`), which DVC
would resolve inside its temporary experiment copies instead.

So the `inputs` stage (`always_changed` in dvc.yaml) hashes them on every `dvc repro` into two small JSON files,
`prepare` depends on the data's and `reference` on the weights'. DVC reruns a stage only when a dep's hash changes,
so a byte changed in the data reruns `prepare` and what its output feeds, and an unchanged input reruns nothing
past `inputs`. The records hold file names relative to the root, not where the root lies: the same files elsewhere
(another machine, a moved folder) are the same inputs.

Light on purpose, as `inputs` runs on every `dvc repro`: neither this module nor the stage imports torch or
scikit-learn, and a file's hash is read again only when its size or modification time changed (`sha256`'s cache,
kept by the stage in the project's .cache/, as DVC keeps its own). A machine without the data (one that pulled the
outputs to analyse them) keeps the record it pulled (pipelines/inputs.py), so that nothing reruns there.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

# the one file scikit-learn's load_digits reads, inside its package (cfg.data.datasets' `digits` loader)
_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def sha256(path: str | Path, cache: dict | None = None) -> str:
    """The file's SHA-256, read in 1 MiB blocks; with `cache` ({resolved path: [size, mtime_ns, digest]}, updated
    here), read only when the file's size or modification time differ from the cached ones."""
    path = Path(path)
    stat = path.stat()
    key, seen = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    if cache is not None and cache.get(key, [None, None])[:2] == seen:
        return cache[key][2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if cache is not None:
        cache[key] = [*seen, h.hexdigest()]
    return h.hexdigest()


def data_files(name: str, root: str | Path | None) -> dict[str, Path]:
    """{name: path} of the files data set `name` may read: every file under `root` (whatever the loader picks
    among them; names relative to the root, `/`-separated), or for `digits` scikit-learn's data file (its root is
    unused). Empty when the root does not exist (yet: `data.download` fetches into it)."""
    if name == "digits":
        spec = importlib.util.find_spec("sklearn")  # found, not imported (about a second)
        if spec is None or not spec.submodule_search_locations:
            return {}
        path = Path(spec.submodule_search_locations[0]).joinpath(*_DIGITS_FILE)
        return {"sklearn/" + "/".join(_DIGITS_FILE): path} if path.is_file() else {}
    if root is None:
        return {}
    root = Path(root).expanduser()
    if root.is_file():
        return {root.name: root}
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def data_record(name: str, root: str | Path | None, cache: dict | None = None) -> dict:
    """What `prepare` depends on: the data set's name and the SHA-256 of each of its files (`data_files`)."""
    files = data_files(name, root)
    return {"data": name, "files": {key: sha256(path, cache) for key, path in files.items()}}


def weights_record(path: str | Path | None, cache: dict | None = None) -> dict:
    """What `reference` depends on: the SHA-256 of the Inception weights file (none: no file, or none given)."""
    if path is None:
        return {"inception_weights": None}
    path = Path(path).expanduser()
    return {"inception_weights": sha256(path, cache) if path.is_file() else None}
