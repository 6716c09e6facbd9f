"""`cfg-lab`: the daily verbs of a study in one command (installed with the package: `.venv/bin/cfg-lab`).

    cfg-lab repro [STAGE ...]                 dvc repro, with this environment's tools on PATH
    cfg-lab repro -S sample.steps=16          ... with overrides (or --preset FILE): a dvc exp run in the workspace
    cfg-lab repro --parallel [--gpus 0,1,2,3] the p_uncond arms side by side (cfg/study/parallel.py)
    cfg-lab exp run --preset FILE [-S k=v]    dvc exp run, validated against the params schema first
    cfg-lab exp show [--all]                  dvc exp show with the columns worth reading
    cfg-lab compare [REF] [MINE]              did my run reproduce the committed one? per cell, against seed spread
    cfg-lab ui | sync                         the MLflow UI on the project's store; replay queued logging
    cfg-lab notebook | lab                    the analysis notebook headless (copy in results/), or JupyterLab
    cfg-lab search [--n-trials N] [-S k=v]    build the inputs, run an Optuna worker; search best|apply|dashboard
    cfg-lab plots [--vega-dir DIR]            dvc plots show that works offline (vega scripts inlined)
    cfg-lab bench [...]                       the throughput benchmark

Every verb runs from the project root (the folder with dvc.yaml above the current one) and calls the same code
as the Makefile targets, which are thin wrappers of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# the vega scripts `dvc plots show` loads from a CDN (dvc_render), fetched once from the npm registry
VEGA_PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
# the columns of `dvc exp show` worth reading: the headline metrics and the params a study varies
EXP_SHOW_KEEP = (
    "Experiment",
    "rev",
    "typ",
    "Created",
    "parent",
    "State",
    "Executor",
    "best_fid",
    "best_fid_w",
    "best_fid_p_uncond",
    "max_is",
    "test_accuracy",
    "data.name",
    "train.p_uncond",
    "train.steps",
    "train.lr",
    "model.base_width",
    "sample.w",
    "sample.sampler",
    "sample.steps",
    "sample.n_samples",
    "evaluate.extractor",
)


def project_root() -> Path:
    """The folder holding dvc.yaml, from the current folder upwards."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    raise SystemExit(f"error: {here} is not inside a cfg-lab project (no dvc.yaml and params.yaml above it)")


def tool_env() -> dict[str, str]:
    """The environment with this Python's bin folder first on PATH: `dvc`, `jupyter` and the stages' `python`
    are this environment's, activated or not."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def call(cmd: list[str], root: Path) -> int:
    """Print and run `cmd` in the project root with tool_env(); returns its exit status."""
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd, cwd=root, env=tool_env())
    except FileNotFoundError:
        raise SystemExit(f"error: {cmd[0]} is not installed in {Path(sys.executable).parent}") from None
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------------------------
# repro / exp


def _overrides(args, root: Path) -> dict:
    from cfg.io import load_yaml
    from cfg.study.config import ParamsError
    from cfg.study.presets import flat_overrides, parse_set

    overrides: dict = {}
    for preset in getattr(args, "preset", None) or []:  # in the order given: a later one wins
        path = Path(preset)
        path = path if path.is_file() else root / preset  # from here, else from the project root
        if not path.is_file():
            raise SystemExit(f"error: preset {preset!r} not found (presets/ holds the shipped ones)")
        overrides |= flat_overrides(load_yaml(path.read_text()) or {})
    try:
        overrides |= parse_set(args.set or [])
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
    return overrides


def _exp_run(args, root: Path, extra: list[str]) -> int:
    from cfg.study.config import ParamsError
    from cfg.study.presets import exp_run_command

    try:
        cmd = exp_run_command(
            _overrides(args, root),
            params_file=root / "params.yaml",
            name=getattr(args, "name", None),
            extra=extra,
        )
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "dry_run", False):
        print(shlex.join(cmd))
        return 0
    return call(cmd, root)


def cmd_repro(args, rest: list[str]) -> int:
    root = project_root()
    if args.parallel:  # the arms side by side: one `dvc repro` per arm (cfg/study/parallel.py)
        from cfg.study.parallel import repro_parallel

        if rest:
            raise SystemExit(f"error: --parallel passes no dvc options on, got {shlex.join(rest)}")
        gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else None
        return repro_parallel(
            root,
            args.targets,
            gpus=gpus,
            jobs=args.jobs,
            dry_run=args.dry_run,
            overrides=_overrides(args, root),
            warmup=not args.no_warmup,
        )
    if args.set or args.preset:  # overrides: an experiment applied in the workspace, as `dvc repro` would be
        return _exp_run(args, root, [*args.targets, *rest])
    cmd = ["dvc", "repro", *args.targets, *rest]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return call(cmd, root)


def cmd_exp(args, rest: list[str]) -> int:
    root = project_root()
    if args.action == "run":
        extra = (["--queue"] if args.queue else []) + (["--temp"] if args.temp else []) + rest
        return _exp_run(args, root, extra)
    if args.action == "show":
        return call(exp_show_command(args.all, rest), root)
    if args.set or args.preset:
        raise SystemExit(f"error: -S/--preset apply to `cfg-lab exp run` (or repro), not `exp {args.action}`")
    # the flags this parser took for exp run / show are the other subcommands' own: passed on as given
    passed = [*(["--name", args.name] if args.name else []), *(["--queue"] if args.queue else [])]
    passed += [*(["--temp"] if args.temp else []), *(["--all"] if args.all else [])]
    cmd = ["dvc", "exp", args.action, *passed, *rest]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return call(cmd, root)


def exp_show_command(every_column: bool, rest: list[str]) -> list[str]:
    """`dvc exp show` keeping EXP_SHOW_KEEP (dvc's --drop takes a regular expression of columns to hide)."""
    cmd = ["dvc", "exp", "show", *rest]
    if every_column:
        return cmd
    keep = "|".join(c.replace(".", r"\.") for c in EXP_SHOW_KEEP)
    return [*cmd, "--drop", f"^(?!({keep})$).*$"]


# ---------------------------------------------------------------------------------------------------------
# compare


def cmd_compare(args, rest: list[str]) -> int:
    from cfg.study.compare import ProtocolMismatch, compare, format_table, load_source, verdict

    root = project_root()
    try:
        ref = load_source(args.ref, root)
        mine = load_source(args.mine if Path(args.mine).is_absolute() else str(root / args.mine), root)
        result = compare(ref, mine, sigmas=args.sigmas)
    except (FileNotFoundError, ProtocolMismatch, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"reference {ref.label}\nmine      {mine.label}\n")
    print(format_table(result, tuple(args.metrics)))
    ok, text = verdict(result)
    print()
    print(text)
    if args.csv:
        result.to_csv(args.csv, index=False)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------
# ui / sync / notebook / lab / search / plots / bench


def cmd_tracking(args, rest: list[str]) -> int:
    from cfg.study.tracking import main as tracking_main

    os.chdir(project_root())
    tracking_main([args.verb, *rest])
    return 0


def cmd_notebook(args, rest: list[str]) -> int:
    from analysis.notebook import main as notebook_main

    root = project_root()
    os.chdir(root)
    # this project's runs and results/, not those of the checkout the analysis package was installed from
    has_project = any(a == "--project" or a.startswith("--project=") for a in rest)
    notebook_main(rest if has_project else ["--project", str(root), *rest])
    return 0


def cmd_lab(args, rest: list[str]) -> int:
    """JupyterLab on analysis/tradeoff.ipynb; its python3 kernel is this environment's interpreter."""
    root = project_root()
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        raise SystemExit(
            f"error: JupyterLab is not installed in {Path(sys.executable).parent}: "
            f"{Path(sys.executable).parent / 'pip'} install -e '.[notebook]'"
        )
    # Jupyter refuses to start as root (containers, lent machines) unless told to
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    lab = str(Path(sys.executable).parent / "jupyter-lab")
    # served from the project root (a file argument alone would serve its folder), the notebook opened
    return call([lab, f"--ServerApp.root_dir={root}", "analysis/tradeoff.ipynb", *as_root, *rest], root)


SEARCH_INPUTS = [
    "--data",
    "data/prepared.pt",
    "--classifier",
    "models/classifier.pt",
    "--reference",
    "data/reference.pt",
]


def _check_search(root: Path, rest: list[str]) -> None:
    """params.yaml with the -S overrides and --n-trials among `rest` (the worker's arguments), validated as the
    worker validates them (cfg.search.space.read_search); exits with the one-line error."""
    from cfg.search.space import SearchError, read_search

    ap = argparse.ArgumentParser(prog="cfg-lab search", add_help=False, allow_abbrev=False)
    ap.add_argument("-S", "--set", action="append")
    ap.add_argument("--n-trials", type=int)
    known, _ = ap.parse_known_args(rest)
    try:
        read_search(root / "params.yaml", known.set, known.n_trials)
    except SearchError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_search(args, rest: list[str]) -> int:
    """`cfg-lab search` = build the inputs with DVC, then `pipelines/search.py run` with the inputs' paths;
    `cfg-lab search best|apply|dashboard ...` passes through to pipelines/search.py."""
    root = project_root()
    script = [sys.executable, "pipelines/search.py"]
    if rest and rest[0] in ("best", "apply", "dashboard"):
        if rest[0] == "best" and "--out-dir" not in rest:
            rest = [*rest, "--out-dir", args.out_dir]
        return call([*script, *rest], root)
    if rest and rest[0] == "run":
        rest = rest[1:]
    _check_search(root, rest)  # before the stages: a bad search section is not reported a minute later
    if not args.no_inputs:
        code = call(["dvc", "repro", "prepare", "classifier", "reference"], root)
        if code:
            return code
    return call([*script, "run", *SEARCH_INPUTS, "--out-dir", args.out_dir, *rest], root)


def vega_scripts(folder: Path) -> dict[str, Path]:
    """The minified vega, vega-lite and vega-embed builds in `folder`, fetched once with `npm pack` when absent."""
    files = {name: folder / f"{name}.min.js" for name in VEGA_PACKAGES}
    missing = [n for n, f in files.items() if not f.is_file()]
    if not missing:
        return files
    if shutil.which("npm") is None:
        raise SystemExit(
            f"error: {', '.join(str(files[n]) for n in missing)} missing and npm is not installed: copy the "
            f"build/*.min.js of the npm packages {', '.join(f'{n}@{v}' for n, v in VEGA_PACKAGES.items())} there"
        )
    import tarfile
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{n}@{VEGA_PACKAGES[n]}" for n in missing]
        out = subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: npm pack {' '.join(specs)} failed: {out.stderr.strip()[-500:]}")
        for name in missing:
            (tgz,) = Path(tmp).glob(f"{name}-{VEGA_PACKAGES[name]}.tgz")
            with tarfile.open(tgz) as tar:
                member = tar.extractfile(f"package/build/{name}.min.js")
                files[name].write_bytes(member.read())
    return files


def offline_template(scripts: dict[str, Path]) -> str:
    """A `dvc plots show --html-template` page with the vega scripts inlined in place of dvc_render's CDN tags."""
    bodies = [
        scripts[n].read_text(encoding="utf-8").replace("</script>", "<\\/script>") for n in VEGA_PACKAGES
    ]
    inline = "\n".join(f"<script>{body}</script>" for body in bodies)
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<title>cfg-lab plots</title>\n"
        f"{inline}\n</head>\n<body>\n{{plot_divs}}\n</body>\n</html>\n"
    )


def cmd_plots(args, rest: list[str]) -> int:
    root = project_root()
    folder = Path(args.vega_dir) if args.vega_dir else root / ".cache" / "vega"
    template = folder / "offline.html"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(offline_template(vega_scripts(folder)), encoding="utf-8")
    return call(["dvc", "plots", "show", "--html-template", str(template), "-o", args.out, *rest], root)


def cmd_bench(args, rest: list[str]) -> int:
    return call([sys.executable, "benchmarks/bench_throughput.py", *rest], project_root())


# ---------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    # allow_abbrev off, here and in every subcommand: the unknown flags go on to DVC, and an abbreviation would
    # turn DVC's own `--dry` into cfg-lab's `--dry-run` (which prints the command instead of running DVC's dry run)
    ap = argparse.ArgumentParser(
        prog="cfg-lab",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.epilog = __doc__.split("\n\n", 1)[1]
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kw)

    def overrides(p):
        p.add_argument(
            "-S",
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a params.yaml key (repeatable)",
        )
        p.add_argument(
            "--preset",
            action="append",
            help="a YAML file of overrides, e.g. presets/fashion_mnist_gpu.yaml (repeatable: later ones win)",
        )
        p.add_argument("--dry-run", action="store_true", help="print the dvc command, do not run it")

    p = command("repro", help="dvc repro (with -S/--preset: dvc exp run in the workspace)")
    p.add_argument("targets", nargs="*", help="stages, e.g. train sample")
    overrides(p)
    p.add_argument(
        "--parallel",
        action="store_true",
        help="run the p_uncond arms side by side, one dvc repro each "
        "(train on disjoint GPUs; each arm samples once its model exists)",
    )
    p.add_argument(
        "--gpus", help="with --parallel: the GPUs to use, e.g. 0,1,2,3 (default: every visible one)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="with --parallel on CPU: arms at a time, train and sample alike (default: as many as train arms)",
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="with --parallel on GPUs: do not compile the networks ahead while the upstream stages run",
    )
    p.set_defaults(func=cmd_repro)

    p = command("exp", help="dvc exp run (validated overrides) | show (readable columns) | other dvc exp")
    p.add_argument("action", help="run, show, or any other `dvc exp` subcommand (passed on)")
    overrides(p)
    p.add_argument("--name", help="experiment name (exp run)")
    p.add_argument("--queue", action="store_true", help="queue it (exp run; then dvc queue start)")
    p.add_argument("--temp", action="store_true", help="run it in a temporary folder (exp run)")
    p.add_argument("--all", action="store_true", help="every column (exp show)")
    p.set_defaults(func=cmd_exp)

    p = command("compare", help="did my run reproduce the committed one? per cell, against seed spread")
    p.add_argument("ref", nargs="?", default="HEAD", help="git revision, folder or CSV (default: HEAD)")
    p.add_argument(
        "mine", nargs="?", default="results", help="folder or CSV (default: the workspace's results/)"
    )
    p.add_argument(
        "--sigmas", type=float, default=2.0, help="a reproduction differs by at most this many seed sd"
    )
    p.add_argument("--metrics", nargs="+", default=["fid", "is"], help="metrics shown in the table")
    p.add_argument("--csv", help="also write every row (all metrics) to this CSV")
    p.set_defaults(func=cmd_compare)

    for verb, text in (
        ("ui", "the MLflow UI on the project's store"),
        ("sync", "replay queued MLflow logging"),
    ):
        p = command(verb, help=text, add_help=False)
        p.set_defaults(func=cmd_tracking)

    p = command(
        "notebook",
        help="run analysis/tradeoff.ipynb headless; the executed copy goes to results/",
        add_help=False,
    )
    p.set_defaults(func=cmd_notebook)
    p = command("lab", help="JupyterLab on analysis/tradeoff.ipynb with this environment's kernel")
    p.set_defaults(func=cmd_lab)

    p = command("search", help="make the inputs and run an Optuna worker (or: search best|apply|dashboard)")
    p.add_argument("--out-dir", default="results/search", help="best_params.yaml, summary.json, trials.csv")
    p.add_argument("--no-inputs", action="store_true", help="skip `dvc repro prepare classifier reference`")
    p.set_defaults(func=cmd_search)

    p = command("plots", help="dvc plots show, working offline (vega scripts inlined)")
    p.add_argument(
        "--vega-dir", help="folder of vega.min.js, vega-lite.min.js, vega-embed.min.js (default .cache/vega)"
    )
    p.add_argument("-o", "--out", default="dvc_plots", help="output folder (dvc_plots/index.html)")
    p.set_defaults(func=cmd_plots)

    p = command("bench", help="benchmarks/bench_throughput.py (images/s and MFU)", add_help=False)
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    from cfg.log import setup

    setup()
    args, rest = parser().parse_known_args(argv)
    return args.func(args, rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
