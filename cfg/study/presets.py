"""Presets and search results as `dvc exp run -S key=value` overrides of params.yaml.

A preset (e.g. presets/fashion_mnist_gpu.yaml) lists only the keys that differ from params.yaml, nested by
section. `python -m cfg.study.presets FILE` prints the `dvc exp run` command that applies it; `--run` runs it.
The overrides are validated against the schema merged onto params.yaml before anything runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path

import yaml

from cfg.study.config import ParamsError, params_from_dict


def flat_overrides(preset: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists and scalars are leaves."""
    out: dict[str, object] = {}
    for key, value in preset.items():
        if isinstance(value, dict):
            out.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_set(items: list[str]) -> dict[str, object]:
    """`-S key=value` strings (as `dvc exp run -S` takes them) -> {key: value}, each value read as YAML
    ('3' -> 3, '[0, 1]' -> [0, 1], 'null' -> None)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise ParamsError(
                f"-S {item!r} is not KEY=VALUE with a dotted params.yaml key, e.g. train.steps=400"
            )
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"-S {item!r}: the value is not YAML: {e}".splitlines()[0]) from None
    return out


def apply_overrides(data, overrides: dict[str, object]) -> None:
    """Set dotted overrides in a params mapping in place (a dict, or the YAML document DVC's writer edits);
    missing sections are created, and so are null ones: a `null` mapping reads as empty (a sample.guidance
    entry `interval: null` takes the method's defaults), so `sample.guidance.interval.lambda_lo` goes into it."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value


def merged_params(base: dict, overrides: dict[str, object]) -> dict:
    """params.yaml as a dict with dotted overrides applied (new keys are kept so validation names them)."""
    merged = json.loads(json.dumps(base))
    apply_overrides(merged, overrides)
    return merged


def set_flags(overrides: dict[str, object], base: dict | None = None) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, values in YAML flow style (lists as [a, b], None as null);
    a key that `base` (params.yaml) lacks is `-S +key=value`, DVC's (Hydra's) form for adding one, e.g. a new
    entry of sample.guidance."""
    flags = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        flags += ["-S", f"{'' if base is None or _has_key(base, key) else '+'}{key}={text}"]
    return flags


def _has_key(tree: dict, dotted: str) -> bool:
    node: object = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def exp_run_command(
    overrides: dict[str, object],
    *,
    params_file: str | Path = "params.yaml",
    name: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The validated `dvc exp run` command applying `overrides`; raises ParamsError for bad overrides."""
    base = yaml.safe_load(Path(params_file).read_text())
    try:
        params_from_dict(merged_params(base, overrides))
    except ParamsError as e:
        raise ParamsError(f"override would make params.yaml invalid: {e}") from None
    cmd = ["dvc", "exp", "run", *(["--name", name] if name else []), *(extra or [])]
    return cmd + set_flags(overrides, base)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cfg.study.presets", description=__doc__)
    ap.add_argument("preset", help="YAML file of overrides, nested by section")
    ap.add_argument("--run", action="store_true", help="run the command instead of printing it")
    ap.add_argument("--name", help="experiment name")
    ap.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    args = ap.parse_args(argv)
    overrides = flat_overrides(yaml.safe_load(Path(args.preset).read_text()) or {})
    try:
        cmd = exp_run_command(overrides, name=args.name, extra=["--queue"] if args.queue else None)
    except ParamsError as e:
        raise SystemExit(f"error: {args.preset}: {e}") from None
    if not args.run:
        print(shlex.join(cmd))
        return
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
