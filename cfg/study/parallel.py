"""`cfg-lab repro --parallel`: the study's arms (one per p_uncond) side by side on the GPUs of one host.

DVC runs a pipeline's stages one after another; to run independent stages at once its documentation says to
start one `dvc repro <stage>` per branch of the DAG ("Parallel stage execution" in `dvc repro`'s reference):
each holds DVC's repository lock only while it reads the pipeline and records its results in dvc.lock, and
`--wait-for-lock` makes a second one wait for that lock instead of failing. That is all this module does, in
four phases, each a set of `dvc repro` calls:

    1. upstream   `dvc repro prepare classifier reference …`: what every arm needs, once, on every GPU
    2. train      `dvc repro --single-item train@<p>` (and the guide network) side by side, each pinned by
                  CUDA_VISIBLE_DEVICES to its own slot of `train.devices` GPUs; more arms than slots queue
    3. sample     `dvc repro --single-item sample@<p>` side by side: with `sample.devices: all` every arm
                  shards over every GPU (the GPUs are shared), with `sample.devices: N` an arm takes a slot
    4. the rest   `dvc repro [TARGETS]`: evaluate and report, on every GPU

Why the train arms go to disjoint GPUs and not each over all of them: at the preset's model size a training
step is too small to split (README "Several GPUs": DDP over 2 GPUs trained slower than 1 GPU at the global
batch of 256), while arms on disjoint GPUs do not slow each other. Sampling splits well (its batches are large),
so its arms share every GPU, which also keeps every GPU busy when there are fewer arms than GPUs.

A failed arm does not stop the other arms of its phase: what finished is recorded in dvc.lock (rerunning
repeats only what is missing), the failures are named and the next phases are not started. TARGETS limit the
arms to those the targets need (e.g. `sample@0.1` runs one arm) and are what phase 4 reproduces. On CPU the arms run side by side
without pinning (`jobs` of them at a time), which is how the tests exercise it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue

from cfg.study.store import STUDY_PID_ENV

# stage-name prefixes of each arm phase: the foreach stages over train.p_uncond, and the guide network
TRAIN_ARMS = ("train@", "train_guide")
SAMPLE_ARMS = ("sample@",)


class ParallelError(ValueError):
    """A setting the parallel run cannot use, found before any stage runs."""


@dataclass
class Plan:
    upstream: list[str]  # stages every arm needs: run first, one `dvc repro`
    train: list[str]  # train arms
    sample: list[str]  # sample arms
    train_slots: list[
        dict[str, str]
    ]  # environment of each train slot (CUDA_VISIBLE_DEVICES), one arm at a time
    sample_slots: list[
        dict[str, str]
    ]  # likewise for sample arms; with one shared slot every arm runs at once
    sample_shared: bool  # sample arms all run at once in sample_slots[0] (sample.devices: all on CUDA)
    everything: dict[str, str] = field(default_factory=dict)  # environment of phases 1 and 4


def _is(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p.rstrip("@") or name.startswith(p) for p in prefixes)


def stage_graph(root: Path) -> dict[str, set[str]]:
    """Every stage of the project's dvc.yaml with the stages it depends on, directly or not (DVC's own DAG)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges from a stage to the stages it depends on
        return {s.addressing: {d.addressing for d in nx.descendants(graph, s)} for s in graph.nodes}


def _slots(gpus: list[str], size: int, what: str) -> list[dict[str, str]]:
    if size > len(gpus):
        raise ParallelError(f"{what} = {size} but only {len(gpus)} GPU(s) are given ({','.join(gpus)})")
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i : i + size])} for i in range(0, len(gpus) - size + 1, size)
    ]


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, else every GPU torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def plan(
    graph: dict[str, set[str]],
    *,
    targets: Sequence[str] = (),  # the stages asked for: only the arms they need run (none: every arm)
    kind: str,  # "cuda" or "cpu": train.device resolved
    train_devices: int | str,  # params.yaml's train.devices
    sample_devices: int | str,  # params.yaml's sample.devices
    gpus: list[str] | None = None,  # CUDA: the GPUs to use (default: visible_gpus())
    jobs: int | None = None,  # CPU: arms at a time (default: every arm at once)
) -> Plan:
    """Which stages run in which phase, and on which GPUs."""
    unknown = [t for t in targets if t not in graph]
    if unknown:
        raise ParallelError(
            f"no stage {', '.join(map(repr, unknown))} in dvc.yaml; stages: {', '.join(sorted(graph))}"
        )
    needed = set(graph) if not targets else set(targets).union(*(graph[t] for t in targets))
    train = sorted((s for s in needed if _is(s, TRAIN_ARMS)), key=lambda s: (s != "train_guide", s))
    sample = sorted(s for s in needed if _is(s, SAMPLE_ARMS))
    if not train:
        raise ParallelError(
            f"no stage named {' or '.join(TRAIN_ARMS)}* among the stages to run: nothing to run side by side"
        )
    for s in train:  # an arm that needs another arm could not run beside it
        if graph[s] & set(train):
            raise ParallelError(
                f"stage {s} depends on {sorted(graph[s] & set(train))}: arms must be independent"
            )
    arms = set(train) | set(sample)
    upstream = sorted(set().union(*(graph[s] for s in arms)) - arms)
    if kind != "cuda":
        n = max(1, jobs or len(train))
        slots = [{} for _ in range(n)]
        return Plan(upstream, train, sample, slots, slots, False)
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        raise ParallelError("train.device is cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, --gpus)")
    if len(set(gpus)) < len(gpus):
        raise ParallelError(f"--gpus {','.join(gpus)}: give distinct GPUs, e.g. --gpus 0,1,2,3")
    everything = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    # train.devices: all in a slot means the slot's GPUs; one GPU a slot unless a number asks for more
    per_train = 1 if train_devices == "all" else int(train_devices)
    train_slots = _slots(gpus, per_train, "train.devices")
    if sample_devices == "all":
        return Plan(upstream, train, sample, train_slots, [everything], True, everything)
    sample_slots = _slots(gpus, int(sample_devices), "sample.devices")
    return Plan(upstream, train, sample, train_slots, sample_slots, False, everything)


@dataclass
class ArmResult:
    stage: str
    returncode: int
    seconds: float
    slot: dict[str, str]


def _stream(proc: subprocess.Popen, prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"[{prefix}] {line}")
        sys.stderr.flush()


def dvc_repro(stages: list[str], root: Path, env: dict[str, str], *, single: bool, tag: str) -> ArmResult:
    """One `dvc --wait-for-lock repro` of `stages`, its output prefixed with `tag`, in `env` on top of ours."""
    cmd = ["dvc", "--wait-for-lock", "repro", *(["--single-item"] if single else []), *stages]
    where = f" [{', '.join(f'{k}={v}' for k, v in env.items())}]" if env else ""
    print(f"+ {shlex.join(cmd)}{where}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    bin_dir = str(Path(sys.executable).parent)
    full = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **env}
    full["PYTHONUNBUFFERED"] = "1"
    full[STUDY_PID_ENV] = str(os.getpid())  # every arm's runs under one study run: this process's
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",  # a stage's stray bytes must not end the stream (and the arm's record)
            bufsize=1,
        )
    except FileNotFoundError:
        raise SystemExit(f"error: dvc is not installed in {bin_dir}") from None
    _stream(proc, tag)
    return ArmResult(" ".join(stages), proc.wait(), time.perf_counter() - t0, env)


def run_arms(
    stages: list[str], slots: list[dict[str, str]], root: Path, *, all_at_once: bool
) -> list[ArmResult]:
    """Run every stage as its own `dvc repro --single-item`; each slot runs one arm at a time (all_at_once: every
    arm at once in slots[0]). Returns the results in `stages` order once all have ended."""
    todo: Queue[str] = Queue()
    for s in stages:
        todo.put(s)
    results: dict[str, ArmResult] = {}
    workers = [slots[0]] * len(stages) if all_at_once else slots[: len(stages)]

    def work(env: dict[str, str]) -> None:
        while True:
            try:
                stage = todo.get_nowait()
            except Empty:
                return
            t0 = time.perf_counter()
            try:
                results[stage] = dvc_repro([stage], root, env, single=True, tag=stage)
            except (Exception, SystemExit) as e:  # recorded as failed; the other arms go on
                print(f"[{stage}] could not run: {e}", file=sys.stderr, flush=True)
                results[stage] = ArmResult(stage, 1, time.perf_counter() - t0, env)

    threads = [threading.Thread(target=work, args=(env,), daemon=True) for env in workers]
    for i, t in enumerate(threads):
        t.start()
        if i + 1 < len(threads):
            time.sleep(0.5)  # DVC reads the pipeline under its lock: starting together only makes them wait
    for t in threads:
        t.join()
    return [results[s] for s in stages]


def summary(phases: list[tuple[str, list[ArmResult], float]]) -> str:
    lines = ["phase      stage                     seconds  status   devices"]
    for phase, results, _ in phases:
        for r in results:
            status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
            gpus = r.slot.get("CUDA_VISIBLE_DEVICES", "-")
            lines.append(f"{phase:<10} {r.stage[:25]:<25} {r.seconds:>8.1f}  {status:<8} {gpus}")
    lines.append("wall time per phase: " + ", ".join(f"{p} {s:.1f} s" for p, _, s in phases))
    return "\n".join(lines)


def _write_overrides(params_file: Path, overrides: dict) -> None:
    """Dotted overrides into params.yaml as `dvc exp run -S` does in the workspace (DVC's YAML writer: comments
    and order kept)."""
    from dvc.utils.serialize import modify_yaml

    from cfg.study.presets import apply_overrides

    with modify_yaml(params_file) as data:
        apply_overrides(data, overrides)


def repro_parallel(
    root: Path,
    targets: list[str],
    *,
    gpus: list[str] | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    overrides: dict | None = None,  # dotted key -> value, written into params.yaml (kept if the plan stands)
) -> int:
    """The four phases of the module docstring; returns 0 when every `dvc repro` succeeded."""
    import yaml

    from cfg.engine.device import resolve_device
    from cfg.study.config import ParamsError, params_from_dict
    from cfg.study.presets import merged_params

    params_file = root / "params.yaml"
    original = params_file.read_text()
    try:
        raw = merged_params(yaml.safe_load(original), overrides or {})
        try:
            params = params_from_dict(raw)
        except ParamsError as e:
            raise ParamsError(
                f"override would make params.yaml invalid: {e}" if overrides else str(e)
            ) from None
        kind = resolve_device(params.train.device).type
        if overrides:  # the DAG's arms come from params.yaml (foreach over train.p_uncond): write them first
            _write_overrides(params_file, overrides)
        p = plan(
            stage_graph(root),
            targets=targets,
            kind=kind,
            train_devices=params.train.devices,
            sample_devices=params.sample.devices,
            gpus=gpus,
            jobs=jobs,
        )
    except (ParamsError, ParallelError, RuntimeError) as e:
        params_file.write_text(original)  # refused: params.yaml as it was
        raise SystemExit(f"error: {e}") from None
    if dry_run:
        params_file.write_text(original)
        print(f"upstream: {' '.join(p.upstream) or '-'}  {p.everything or ''}")
        print(
            f"train arms: {' '.join(p.train)} in slots {[s.get('CUDA_VISIBLE_DEVICES', 'cpu') for s in p.train_slots]}"
        )
        mode = "all at once, sharing" if p.sample_shared else "in slots"
        slots = [s.get("CUDA_VISIBLE_DEVICES", "cpu") for s in p.sample_slots]
        print(f"sample arms: {' '.join(p.sample)} {mode} {slots}")
        print(f"then: dvc repro {' '.join(targets)}".rstrip())
        return 0
    if overrides:
        print(f"params.yaml: {len(overrides)} override(s) applied", file=sys.stderr)
    phases: list[tuple[str, list[ArmResult], float]] = []
    t0 = time.perf_counter()
    if p.upstream:
        r = dvc_repro(p.upstream, root, p.everything, single=False, tag="upstream")
        phases.append(("upstream", [r], time.perf_counter() - t0))
        if r.returncode:
            print(summary(phases), file=sys.stderr)
            return r.returncode
    for name, stages, slots, shared in (
        ("train", p.train, p.train_slots, False),
        ("sample", p.sample, p.sample_slots, p.sample_shared),
    ):
        t1 = time.perf_counter()
        results = run_arms(stages, slots, root, all_at_once=shared)
        phases.append((name, results, time.perf_counter() - t1))
        failed = [r.stage for r in results if r.returncode]
        if failed:
            print(summary(phases), file=sys.stderr)
            print(
                f"error: {', '.join(failed)} failed (output above); the arms that ended are recorded in dvc.lock, "
                "so rerunning repeats only the rest",
                file=sys.stderr,
            )
            return 1
    t1 = time.perf_counter()
    r = dvc_repro(targets, root, p.everything, single=False, tag="rest")
    phases.append(("rest", [r], time.perf_counter() - t1))
    print(summary(phases), file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return r.returncode
