"""Rewrite each dvc.yaml stage's library deps from what its script imports (the walk tests/test_dvc_deps.py
checks): `python scripts/dvc_deps.py` after adding or moving a cfg module."""

import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_dvc_deps import MONITORING, PLUMBING, cfg_imports  # noqa: E402


def main() -> None:
    yaml = YAML()
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load((ROOT / "dvc.yaml").read_text())
    for stage in doc["stages"].values():
        stage = stage.get("do", stage)
        script = stage["cmd"].split()[1]
        need = sorted(cfg_imports(ROOT / script) - PLUMBING - MONITORING)
        rest = [d for d in stage["deps"] if not str(d).startswith("cfg/") and d != script]
        seq = CommentedSeq([script, *need, *rest])
        seq.fa.set_flow_style()
        stage["deps"] = seq
    with open(ROOT / "dvc.yaml", "w") as f:
        yaml.dump(doc, f)


if __name__ == "__main__":
    main()
