"""Stage `inputs` (always run): hash the files outside the repository that the study reads, the data set's and the
Inception weights, into the JSON files that `prepare` and `reference` depend on (cfg.data.sources says why)."""

import argparse
import json
import sys
from pathlib import Path

from cfg.data.sources import data_record, weights_record
from cfg.io import load_yaml, write_json
from cfg.study.store import data_root, project_root

# the hashes of files already read ({path: [size, mtime_ns, digest]}), per checkout (.cache/ is not in git)
HASH_CACHE = Path(".cache") / "inputs-sha256.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="JSON record of the data set's files (a dep of prepare)")
    ap.add_argument(
        "--weights", required=True, help="JSON record of the Inception weights (a dep of reference)"
    )
    args = ap.parse_args()
    # three keys, read without the schema (which imports torch: seconds on every repro); prepare, the next stage,
    # validates all of params.yaml
    raw = load_yaml(Path("params.yaml").read_text()) or {}
    d, e = raw.get("data") or {}, raw.get("evaluate") or {}
    name, root = d.get("name"), d.get("root")
    cache_file = project_root() / HASH_CACHE
    cache = _read_json(cache_file)
    data = data_record(name, data_root(root), cache)
    # the records DVC left in place (persist: the ones pulled or last written). Where the files are absent (a
    # machine that pulled the outputs to analyse them) they stand, so that nothing reruns for the absence; should
    # prepare or reference have to run, it stops naming the missing files
    kept = _read_json(Path(args.data))
    if not data["files"] and kept.get("data") == name and kept.get("files"):
        print(
            f"[inputs] no {name} files under {root}: kept the {len(kept['files'])} recorded", file=sys.stderr
        )
        data = kept
    weights_file = data_root(e.get("inception_weights"))
    weights = weights_record(weights_file, cache)
    kept = _read_json(Path(args.weights))
    if weights_file and weights["inception_weights"] is None and kept.get("inception_weights"):
        print(f"[inputs] no Inception weights at {weights_file}: kept the recorded hash", file=sys.stderr)
        weights = kept
    write_json(args.data, data)
    write_json(args.weights, weights)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache_file, cache)
    where = f" under {root}" if root else ""
    print(f"[inputs] {name}: {len(data['files'])} file(s){where} hashed")


if __name__ == "__main__":
    main()
