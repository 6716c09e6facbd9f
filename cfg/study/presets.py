"""Presets and search results as `dvc exp run -S key=value` overrides of params.yaml.

A preset (e.g. presets/fashion_mnist_gpu.yaml) lists only the keys that differ from params.yaml, nested by
section. `python -m cfg.study.presets FILE` prints the `dvc exp run` command that applies it; `--run` runs it.
The overrides are applied to a copy of params.yaml by DVC's own code and the result validated against the schema
before anything runs (`dvc_applied`): what is checked is what `dvc exp run -S` writes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cfg.io import load_yaml
from cfg.study.config import Params, ParamsError, params_from_dict


def flat_overrides(preset: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists, scalars and empty mappings are leaves (`interval: {}`
    adds that entry with its method's defaults, `sampler_options: {}` empties the options)."""
    out: dict[str, object] = {}
    for key, value in preset.items():
        if isinstance(value, dict) and value:
            out.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_set(items: list[str]) -> dict[str, object]:
    """`-S key=value` strings (as `dvc exp run -S` takes them) -> {key: value}, each value read as YAML as DVC
    and Hydra read it ('3' -> 3, '[0, 1]' -> [0, 1], 'null' -> None, '1e-5' -> 1e-05: `load_yaml`)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise ParamsError(
                f"-S {item!r} is not KEY=VALUE with a dotted params.yaml key, e.g. train.steps=400"
            )
        try:
            out[key.strip()] = load_yaml(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"-S {item!r}: the value is not YAML: {e}".splitlines()[0]) from None
    return out


def apply_overrides(data, overrides: dict[str, object]) -> None:
    """Set dotted overrides in a params mapping in place (a dict, or the YAML document DVC's writer edits);
    missing sections are created, and so are null ones: a `null` mapping reads as empty (a sample.guidance
    entry `interval: null` takes the method's defaults), so `sample.guidance.interval.lambda_lo` goes into it.
    A value replaces what was there, a mapping too (`sample.sampler_options={}` empties it): the meaning of an
    override throughout cfg-lab, which `hydra_overrides` makes DVC's."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise ParamsError(f"-S {dotted}: {where} is {node!r}, not a mapping of keys")
        node[leaf] = value


def merged_params(base: dict, overrides: dict[str, object]) -> dict:
    """params.yaml as a dict with dotted overrides applied (new keys are kept so validation names them)."""
    merged = json.loads(json.dumps(base))
    apply_overrides(merged, overrides)
    return merged


def hydra_overrides(overrides: dict[str, object], base: dict) -> list[str]:
    """The overrides as DVC's `dvc exp run -S` takes them (Hydra's override grammar), so that DVC applies each as
    `apply_overrides` does. DVC merges a mapping into the one there (`sample.sampler_options={}` would keep
    `v`; a new key in it is refused, as Hydra's config is in struct mode), so a mapping replacing a value of
    `base` (params.yaml) is `~key` (delete) then `+key=value` (add); a key that `base` lacks is `+key=value`
    (e.g. a new entry of sample.guidance). Values as YAML flow style ([a, b], {k: v}, null), a string quoted
    where Hydra would read it otherwise ('a,b' is a sweep over two experiments, 'a=b' an error, '1' a
    number)."""
    state = json.loads(json.dumps(base))  # params.yaml after the overrides so far
    out: list[str] = []
    for key, value in overrides.items():
        item = f"{key}={_hydra_text(key, value)}"
        present, current = _lookup(state, key)
        if not present:
            out.append(f"+{item}")
        elif current is not None and (isinstance(current, dict) or isinstance(value, dict)):
            out += [f"~{key}", f"+{item}"]  # `~` needs a value there: a null one is simply set
        else:
            out.append(item)
        apply_overrides(state, {key: value})
    return out


def _hydra_text(key: str, value: object) -> str:
    """`value` in Hydra's grammar: plain when Hydra reads it back as `value`, else with every string quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for quote in (False, True):
        text = _render(value, quote)
        try:
            parsed = parser.parse_override(f"{key}={text}")
        except Exception:  # Hydra's grammar refuses it (e.g. `a=b`, `~/x`, non-ASCII): quote it
            continue
        if not parsed.is_sweep_override() and _same(parsed.value(), value, strict=True):
            return text
    raise ParamsError(f"-S {key}: {value!r} cannot be passed to DVC (Hydra's override grammar)")


def _render(value: object, quote: bool) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float):
        return repr(value)  # the shortest text of the very float: 1e-05, 0.0002
    if isinstance(value, str):
        if not quote:
            return value
        # Hydra's quoted string: a quote escaped, and a backslash doubled where it precedes a quote or the end
        escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v, quote) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_render(k, False)}: {_render(v, quote)}" for k, v in value.items()) + "}"
    return str(value)


def _same(a: object, b: object, *, strict: bool = False) -> bool:
    """Equal values, NaN equal to NaN; `strict`: of the same types too (1 is not 1.0, True, or '1')."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], strict=strict) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, strict=strict) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return (type(a) is type(b) or not strict) and a == b


def _lookup(tree: dict, dotted: str) -> tuple[bool, object]:
    node: object = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


@dataclass
class Applied:
    """Overrides as DVC applies them to params.yaml (`dvc_applied`)."""

    overrides: list[str]  # `hydra_overrides`: what `dvc exp run -S` gets
    text: str  # params.yaml as DVC writes it (its YAML writer: comments and order kept)
    params: Params  # that params.yaml, validated


def dvc_applied(params_file: str | Path, overrides: dict[str, object]) -> Applied:
    """Apply `overrides` to a copy of params.yaml with DVC's own `apply_overrides` (what `dvc exp run -S` runs)
    and validate the result, read as the stages read it: what cfg-lab checks is what DVC will write, and what
    `cfg-lab repro --parallel` writes. ParamsError when DVC refuses them, when they would not end as
    `merged_params` (each key set to its value, mappings replaced) or when the result is invalid."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    text = Path(params_file).read_text()
    base = load_yaml(text) or {}
    items = hydra_overrides(overrides, base)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(text)
        try:
            dvc_apply_overrides(copy, items)
        except Exception as e:  # DVC's InvalidArgumentError (Hydra's reason as its cause), an interpolation
            why = e.__cause__ or e
            raise ParamsError(
                f"DVC refuses the overrides {' '.join(items)}: {str(why).strip().splitlines()[0]}"
            ) from None
        new_text = copy.read_text()
    new = load_yaml(new_text) or {}
    want = merged_params(base, overrides)
    if not _same(new, want):
        # the overrides that did not come out as given (read back as the stages read params.yaml: `on` is True)
        wrong = [
            f"{k} = {_lookup(new, k)[1]!r}, not {v!r}"
            for k, v in overrides.items()
            if not _same(_lookup(new, k)[1], v)
        ]
        raise ParamsError(
            "DVC would not apply the overrides as given: "
            + ("; ".join(wrong) or "params.yaml would change outside the keys overridden")
        )
    try:
        params = params_from_dict(new)
    except ParamsError as e:
        raise ParamsError(f"override would make params.yaml invalid: {e}") from None
    return Applied(items, new_text, params)


def exp_run_command(
    overrides: dict[str, object],
    *,
    params_file: str | Path = "params.yaml",
    name: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The validated `dvc exp run` command applying `overrides`; raises ParamsError for bad overrides."""
    applied = dvc_applied(params_file, overrides)
    cmd = ["dvc", "exp", "run", *(["--name", name] if name else []), *(extra or [])]
    return cmd + [arg for item in applied.overrides for arg in ("-S", item)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cfg.study.presets", description=__doc__)
    ap.add_argument("preset", help="YAML file of overrides, nested by section")
    ap.add_argument("--run", action="store_true", help="run the command instead of printing it")
    ap.add_argument("--name", help="experiment name")
    ap.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    args = ap.parse_args(argv)
    overrides = flat_overrides(load_yaml(Path(args.preset).read_text()) or {})
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
