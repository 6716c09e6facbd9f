"""Hyper-parameter search with Optuna over params.yaml keys (not a DVC stage: `dvc repro` never runs it).

run        join (or create) the study in search.storage and run trials until it has search.n_trials; start the
           same command on more machines to share the study (PostgreSQL storage); then write the results.
           --gpus 0,1 starts one worker per GPU (CUDA_VISIBLE_DEVICES), --workers N N per GPU or N on the CPU
best       write the results of the study as it stands (best_params.yaml, summary.json, trials.csv)
apply      print (or --run) the `dvc exp run -S key=value ...` that reproduces a best_params.yaml
dashboard  optuna-dashboard on the study's storage (pip install -e '.[dashboard]')
"""

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from cfg.data.datasets import load_prepared
from cfg.engine.device import resolve_device
from cfg.eval.stats import load_reference_stats
from cfg.io import atomic_write_text, load_yaml, write_json
from cfg.log import get_logger, setup
from cfg.search.objective import SearchInputs
from cfg.search.results import best_params_yaml, best_trials, summary
from cfg.search.space import SearchError, read_search
from cfg.search.storage import storage_url
from cfg.search.worker import quiet_optuna, run_worker, worker_slots
from cfg.study.config import ParamsError
from cfg.study.presets import exp_run_command, flat_overrides
from cfg.study.stage import make_extractor
from cfg.study.store import masked
from cfg.study.tracking import Tracker

log = get_logger("search")


def _spec(path: str, args=None):
    """The validated params file and search section with the command line's overrides (`-S key=value`,
    `--n-trials`), or exit with the one-line error."""
    try:
        return read_search(path, getattr(args, "set", None), getattr(args, "n_trials", None))
    except SearchError as e:
        raise SystemExit(f"error: {e}") from None


def write_results(study: optuna.Study, out_dir: Path, params, trial_number: int | None = None) -> None:
    """best_params.yaml (the best trial, the front's lowest FID, or --trial), summary.json, trials.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summ = summary(study)
    write_json(out_dir / "summary.json", summ)
    atomic_write_text(out_dir / "trials.csv", study.trials_dataframe().to_csv(index=False))
    files = [out_dir / "summary.json", out_dir / "trials.csv"]
    if trial_number is not None:
        chosen = study.trials[trial_number]
        if chosen.state != optuna.trial.TrialState.COMPLETE:
            raise SystemExit(f"error: trial {trial_number} is {chosen.state.name}, not COMPLETE")
    else:
        best = best_trials(study)
        chosen = best[0] if best else None
    if chosen is not None:
        atomic_write_text(out_dir / "best_params.yaml", best_params_yaml(study, chosen))
        files.append(out_dir / "best_params.yaml")
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        tracker = Tracker.open("search", params.tracking.experiment)
        states = summ["states"]
        tracker.log(
            run_id,
            metrics={
                "trials": summ["trials"],
                **{f"trials_{k}": states[k] for k in ("complete", "pruned", "fail")},
                **({"best_fid": chosen.values[0]} if chosen is not None else {}),
            },
        )
        for f in files:
            tracker.log_artifact(run_id, f)
        tracker.end(run_id)
        tracker.finish()
    line = f"[search] study {study.study_name!r}: {summ['trials']} trials ("
    line += ", ".join(f"{n} {k}" for k, n in summ["states"].items() if n) + ")"
    if chosen is not None:
        values = ", ".join(f"{n} {v:.4g}" for n, v in zip(("FID", "IS"), chosen.values, strict=False))
        line += f"; trial {chosen.number}: {values} -> {out_dir / 'best_params.yaml'}"
    print(line)


def run_workers(slots: list[dict[str, str]]) -> int:
    """This command again as one worker per slot (its environment, e.g. CUDA_VISIBLE_DEVICES); SIGINT, SIGTERM
    and SIGHUP are passed on to each worker once. Returns the first failed worker's exit status, else 0."""
    cmd = [sys.executable, sys.argv[0], *sys.argv[1:], "--gpus=", "--workers=1"]  # the last value counts
    procs: list[subprocess.Popen] = []
    stop: list[int] = []

    def forward(signum, frame) -> None:
        stop.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    for i, env in enumerate(slots):
        if stop:
            break
        # a session of its own: a Ctrl-C reaches the launcher, which passes it on once
        procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True))
        pinned = ", ".join(f"{k}={v}" for k, v in env.items()) or "unpinned"
        log.info(f"worker {i + 1}/{len(slots)}: pid {procs[-1].pid}, {pinned}")
    codes = [p.wait() for p in procs]
    failed = [(p.pid, 128 - c if c < 0 else c) for p, c in zip(procs, codes, strict=True) if c]
    for pid, code in failed:
        log.warning(f"worker pid {pid} exited with status {code}")
    return failed[0][1] if failed else (128 + stop[0] if stop else 0)


def cmd_run(args) -> None:
    spec = _spec(args.params, args)
    device = resolve_device(spec.params.train.device)
    if args.gpus or args.workers != 1:  # the launcher of this machine's workers
        count = torch.cuda.device_count()  # of CUDA_VISIBLE_DEVICES's list, where it is set
        try:
            slots = worker_slots(
                args.gpus, args.workers, device.type, count, os.environ.get("CUDA_VISIBLE_DEVICES")
            )
        except SearchError as err:
            raise SystemExit(f"error: {err}") from None
        raise SystemExit(run_workers(slots))
    e = spec.params.evaluate
    inputs = SearchInputs(
        data=load_prepared(args.data),
        extractor=make_extractor(e.extractor, args.classifier, e.inception_weights, device),
        reference=load_reference_stats(args.reference),
        device=device,
    )
    try:
        inputs.check(args.classifier if e.extractor == "classifier" else e.inception_weights, args.reference)
    except SearchError as err:
        raise SystemExit(f"error: {err}") from None
    t0 = time.perf_counter()
    try:
        study = run_worker(spec, inputs, storage=args.storage)
    except SearchError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:  # Ctrl-C: a trial it was running is queued again (Objective)
        log.warning(f"worker interrupted after {time.perf_counter() - t0:.0f}s")
        raise SystemExit(128 + signal.SIGINT) from None
    log.info(f"worker done in {time.perf_counter() - t0:.0f}s")
    write_results(study, Path(args.out_dir), spec.params)


def _load_study(args, spec) -> optuna.Study:
    url = storage_url(args.storage or spec.search.storage)
    try:
        return optuna.load_study(study_name=spec.search.study_name, storage=url)
    except KeyError:
        raise SystemExit(f"error: no study {spec.search.study_name!r} in {masked(url)}") from None


def cmd_best(args) -> None:
    spec = _spec(args.params, args)
    write_results(_load_study(args, spec), Path(args.out_dir), spec.params, args.trial)


def cmd_apply(args) -> None:
    overrides = flat_overrides(load_yaml(Path(args.file).read_text()) or {})
    try:
        cmd = exp_run_command(overrides, params_file=args.params, name=args.name, extra=args.dvc_args)
    except ParamsError as e:
        raise SystemExit(f"error: {args.file}: {e}") from None
    print(shlex.join(cmd))
    if args.run:
        raise SystemExit(subprocess.call(cmd))


def cmd_dashboard(args) -> None:
    spec = _spec(args.params, args)
    url = storage_url(args.storage or spec.search.storage)
    print(f"optuna-dashboard on http://{args.host}:{args.port} (storage {masked(url)})", flush=True)
    cmd = ["optuna-dashboard", url, "--host", args.host, "--port", str(args.port)]
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        raise SystemExit("error: optuna-dashboard is not installed; pip install -e '.[dashboard]'") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="parameter file with a search section")
    sub = ap.add_subparsers(dest="command", required=True)

    def overridable(parser) -> None:
        parser.add_argument(
            "-S",
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a params.yaml key for this command, e.g. -S train.steps=200 (repeatable); every "
            "worker of a study needs the same",
        )
        parser.add_argument("--n-trials", type=int, help="the study's trial budget (search.n_trials)")

    run = sub.add_parser("run", help="run a worker of the study, then write the results")
    run.add_argument("--data", required=True, help="prepared data file (stage prepare)")
    run.add_argument("--classifier", required=True, help="evaluation classifier (stage classifier)")
    run.add_argument("--reference", required=True, help="reference statistics (stage reference)")
    run.add_argument("--out-dir", required=True, help="folder for best_params.yaml, summary.json, trials.csv")
    run.add_argument("--storage", help="SQLAlchemy URL of the study; overrides search.storage")
    run.add_argument(
        "--gpus",
        help="one worker per listed GPU, pinned to it by CUDA_VISIBLE_DEVICES, e.g. 0,1 (make GPUS=0,1); where "
        "CUDA_VISIBLE_DEVICES is set, indices of its list",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes per GPU of --gpus, or on this machine without --gpus (make WORKERS=N)",
    )
    overridable(run)
    run.set_defaults(func=cmd_run)

    best = sub.add_parser("best", help="write the results of the study as it stands")
    best.add_argument(
        "--out-dir", required=True, help="folder for best_params.yaml, summary.json, trials.csv"
    )
    best.add_argument("--trial", type=int, help="write this trial's parameters instead of the best's")
    best.add_argument("--storage", help="SQLAlchemy URL of the study; overrides search.storage")
    overridable(best)
    best.set_defaults(func=cmd_best)

    apply = sub.add_parser("apply", help="dvc exp run with a best_params.yaml")
    apply.add_argument("file", help="YAML of dotted overrides, e.g. results/search/best_params.yaml")
    apply.add_argument("--run", action="store_true", help="run the command, not only print it")
    apply.add_argument("--name", help="experiment name")
    apply.add_argument("dvc_args", nargs="*", help="more `dvc exp run` arguments, after --, e.g. -- --temp")
    apply.set_defaults(func=cmd_apply)

    dash = sub.add_parser("dashboard", help="optuna-dashboard on the study's storage")
    dash.add_argument("--storage", help="SQLAlchemy URL of the study; overrides search.storage")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8080)
    overridable(dash)
    dash.set_defaults(func=cmd_dashboard)

    args = ap.parse_args()
    setup()
    quiet_optuna()
    args.func(args)


if __name__ == "__main__":
    main()
