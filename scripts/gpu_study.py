"""Run the study on a lent GPU machine: params.yaml + a preset + `key=value` overrides, then `dvc repro`.

    . .whl/gpu-env.sh && python scripts/gpu_study.py presets/fashion_mnist_gpu.yaml data.root=.fmnist \
        train.steps=1500 'train.p_uncond=[0.1]' --out "$OUT"

Writes the merged params.yaml (validated first), runs `dvc repro` with the stages' output streaming, and copies
params.yaml, the results (table, metrics, report, figure, a sample grid) and the first model's FID curve
(eval.csv) and dvc.lock into --out: 8 files, as many as a lent GPU machine returns.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfg.io import load_yaml  # noqa: E402
from cfg.study.config import params_from_dict  # noqa: E402
from cfg.study.presets import flat_overrides, merged_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="preset YAML (only what differs from params.yaml)")
    ap.add_argument(
        "overrides", nargs="*", help="key=value (YAML values) or more preset files (*.yaml), applied in order"
    )
    ap.add_argument("--out", required=True, help="folder for what comes back")
    ap.add_argument(
        "--targets", nargs="*", default=[], help="dvc repro only these stages (and what they need)"
    )
    ap.add_argument(
        "--parallel", action="store_true", help="cfg-lab repro --parallel: the p_uncond arms side by side"
    )
    args = ap.parse_args()
    base = load_yaml(Path("params.yaml").read_text())
    changes = flat_overrides(load_yaml(Path(args.preset).read_text()))
    for item in args.overrides:
        if item.endswith((".yaml", ".yml")) and "=" not in item:  # another preset on top
            changes |= flat_overrides(load_yaml(Path(item).read_text()))
            continue
        key, _, value = item.partition("=")
        changes[key] = load_yaml(value)
    merged = merged_params(base, changes)
    params_from_dict(merged)  # fail here, before any work
    Path("params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    t0 = time.perf_counter()
    if args.parallel:
        rc = subprocess.call([sys.executable, "-m", "cfg.cli", "repro", "--parallel", *args.targets])
    else:
        rc = subprocess.call(["dvc", "repro", *args.targets])
    print(f"[gpu_study] repro exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src in [
        "params.yaml",
        "results/tradeoff.csv",
        "results/metrics.json",
        "results/report.md",
    ]:
        if Path(src).is_file():
            shutil.copy(src, out / Path(src).name)
    for grid in sorted(Path("samples").glob("p_uncond=*/grid.png"))[:1]:
        shutil.copy(grid, out / "grid.png")
    for curve in sorted(Path("models").glob("p_uncond=*/eval.csv"))[:1]:
        shutil.copy(curve, out / "eval.csv")
    if Path("dvc.lock").is_file():
        shutil.copy("dvc.lock", out / "dvc.lock")
    if Path("results/plots/tradeoff.png").is_file():
        shutil.copy("results/plots/tradeoff.png", out / "tradeoff.png")
    sys.exit(rc)


if __name__ == "__main__":
    main()
