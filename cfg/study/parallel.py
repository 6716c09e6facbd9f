"""`cfg-lab repro --parallel`: the study's arms (one per p_uncond) side by side on the GPUs of one host.

DVC runs a pipeline's stages one after another; to run independent stages at once its documentation says to
start one `dvc repro <stage>` per branch of the DAG ("Parallel stage execution" in `dvc repro`'s reference):
each holds DVC's repository lock only while it reads the pipeline and records its results in dvc.lock, and
`--wait-for-lock` makes a second one wait for that lock instead of failing. That is all this module does, in
three parts, each a set of `dvc repro` calls:

    1. upstream   `dvc repro prepare classifier reference …`: what every arm needs, once, on every GPU; on GPUs,
                  `prepare` alone first and then, beside the others, `cfg.engine.warmup` compiling the arms'
                  networks (`Warmup`: the train stage's on the last GPU, and the train arms start once its
                  training step is compiled; at the same time the sample stage's, once per rank of a sample arm)
    2. the arms   one `dvc repro --single-item <arm>` each, started as soon as the arms it needs have succeeded and
                  a slot of its kind is free (DVC's own DAG says which: `sample@<p>` needs `train@<p>` and the
                  guide network), so an arm's sampling runs while the other arms still train:
                    train   `train@<p>` and `train_guide`, each pinned by CUDA_VISIBLE_DEVICES to its own slot
                            of `train.devices` GPUs; more arms than slots queue for the next free slot
                    sample  `sample@<p>`: with `sample.devices: all` every arm shards over every GPU (the GPUs
                            are shared: no slot, but at most ARMS_PER_GPU arms on a GPU, a training model's
                            included), with `sample.devices: N` an arm takes a slot of N
    3. the rest   `dvc repro [TARGETS]`: evaluate and report, on every GPU

Why the train arms go to disjoint GPUs and not each over all of them: at the preset's model size a training
step is too small to split (README "Several GPUs": DDP over 2 GPUs trained slower than 1 GPU at the global
batch of 256), while arms on disjoint GPUs do not slow each other. Sampling splits well (its batches are large),
so its arms share every GPU, which also keeps every GPU busy when there are fewer arms than GPUs. Why an arm
samples as soon as its model exists rather than after every model: a train arm leaves its GPU idle for up to minutes
(start-up, compilation, DVC's bookkeeping), which a sample arm fills; on one GPU the arms would otherwise train
one after another with nothing beside them. A sample arm may therefore share a GPU with a train arm still
running (and with `sample.devices: N`, its slot's GPUs with one): they time-share the GPU.

A failed arm does not stop the arms that do not need it: what finished is recorded in dvc.lock (rerunning
repeats only what is missing), the failures are named, the arms that needed them are not started and the rest
is not started. Stopped (Ctrl-C, SIGTERM, SIGHUP), it stops every `dvc repro` it started, each with its stage
(`stop_all`), instead of leaving them running without it. TARGETS limit the arms to those the targets need (e.g. `sample@0.1` runs one train and one
sample arm) and are what part 3 reproduces. On CPU the arms run side by side without pinning, train and sample
arms drawing on one pool of `jobs` slots (default: as many as train arms), which is how the tests exercise it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

from cfg.study.store import STUDY_PID_ENV

# stage-name prefixes of each kind of arm: the foreach stages over train.p_uncond, and the guide network
TRAIN_ARMS = ("train@", "train_guide")
SAMPLE_ARMS = ("sample@",)

# With `sample.devices: all` the sample arms share every GPU, so the number of them running at once is what bounds
# a GPU's processes: at most this many arms on a GPU at once, a training model's counting as one (two sample arms
# beside a model, three when none trains; more p_uncond wait their turn). Three sample arms of the preset's batch
# fitted an 80 GB H100, and sampled no faster together (473 images/s) than one process alone (506): a fourth
# would only add a process's memory (model, compiled graphs, batch) to the GPU, and risk running out of it.
ARMS_PER_GPU = 3


class ParallelError(ValueError):
    """A setting the parallel run cannot use, found before any stage runs."""


@dataclass
class Plan:
    upstream: list[str]  # stages every arm needs: run first, one `dvc repro`
    train: list[str]  # train arms
    sample: list[str]  # sample arms
    # the environment of each train slot (CUDA_VISIBLE_DEVICES), one arm at a time in each
    train_slots: list[dict[str, str]]
    # likewise for sample arms; when sample_shared no slot is waited for and sample_slots[0] is every GPU
    sample_slots: list[dict[str, str]]
    sample_shared: bool  # sample arms wait for no slot, all in sample_slots[0] (sample.devices: all, CUDA)
    everything: dict[str, str] = field(default_factory=dict)  # environment of parts 1 and 3
    # arm -> the arms that must have succeeded before it starts
    needs: dict[str, list[str]] = field(default_factory=dict)
    one_pool: bool = False  # CPU: train and sample arms draw on the same slots (`jobs` arms at a time)
    # `cfg.engine.warmup` parts compiled while the upstream stages run (CUDA; none when nothing is compiled or
    # no arm of theirs is out of date), and each part's environment: train on the last GPU, sample on the GPUs
    # of a sample arm (one process per device index, as its ranks)
    warm: list[str] = field(default_factory=list)
    warm_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # sample_shared: how many arms may run on a GPU at once, a training model included (ARMS_PER_GPU)
    arms_per_gpu: int = ARMS_PER_GPU


def _is(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p.rstrip("@") or name.startswith(p) for p in prefixes)


def stage_graph(root: Path) -> dict[str, set[str]]:
    """Every stage of the project's dvc.yaml with the stages it depends on, directly or not (DVC's own DAG)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges from a stage to the stages it depends on
        return {s.addressing: {d.addressing for d in nx.descendants(graph, s)} for s in graph.nodes}


def _stages_of(target: str, graph: dict[str, set[str]]) -> list[str]:
    """The stages a target names: itself, or every item of the foreach group of that name."""
    if target in graph:
        return [target]
    return sorted(s for s in graph if s.startswith(f"{target}@"))


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
    jobs: int | None = None,  # CPU: arms at a time, train and sample alike (default: as many as train arms)
) -> Plan:
    """Which stages run in which part, after which arms, and on which GPUs. A target is a stage or, as for
    `dvc repro`, a foreach group's name (`train`: every `train@<p>`)."""
    stages = [s for t in targets for s in _stages_of(t, graph)]
    unknown = [t for t in targets if not _stages_of(t, graph)]
    if unknown:
        groups = sorted({s.partition("@")[0] for s in graph if "@" in s})
        raise ParallelError(
            f"no stage {', '.join(map(repr, unknown))} in dvc.yaml; stages: {', '.join(sorted(graph))}"
            + (f" (or a group of them: {', '.join(groups)})" if groups else "")
        )
    needed = set(graph) if not targets else set(stages).union(*(graph[t] for t in stages))
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
    needs = {s: sorted(graph[s] & set(train)) for s in sample}
    if kind != "cuda":
        n = max(1, jobs or len(train))
        slots = [{} for _ in range(n)]
        return Plan(upstream, train, sample, slots, slots, False, needs=needs, one_pool=True)
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
        return Plan(upstream, train, sample, train_slots, [everything], True, everything, needs)
    sample_slots = _slots(gpus, int(sample_devices), "sample.devices")
    return Plan(upstream, train, sample, train_slots, sample_slots, False, everything, needs)


@dataclass
class ArmResult:
    stage: str
    returncode: int  # of its `dvc repro`; 1 as well for an arm not started (see `not_run`)
    seconds: float
    slot: dict[str, str]
    start: float = 0.0  # seconds after its part began
    not_run: list[str] | None = None  # the failed arms it needed: it was not started

    @property
    def status(self) -> str:
        if self.not_run:
            return "not run"
        return "ok" if self.returncode == 0 else f"exit {self.returncode}"


def _say(*text: str) -> None:
    """A status line to stderr, never raising for it: stderr may be a terminal that hung up (SIGHUP, the ssh
    connection dropped: EIO) or a closed pipe, and the run must still stop its arms and account for them."""
    try:
        print(*text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _stream(proc: subprocess.Popen, prefix: str, on_line: Callable[[str], None] | None = None) -> None:
    """Each line of `proc`'s output to stderr, prefixed; read to the end whether or not stderr takes it (a stage
    whose pipe is not drained would block on its next line)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            sys.stderr.write(f"[{prefix}] {line}")
            sys.stderr.flush()
        except OSError:
            pass
        if on_line is not None:
            on_line(line)


# the `dvc repro` processes running now, each the leader of its own process group (its stage and any torchrun
# in it), so that stopping the parallel run stops all of them (`stop_all`) instead of leaving them orphaned
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()  # held while one starts, so that `stop_all` sees it or it never starts
_STOPPING = threading.Event()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _members(proc: subprocess.Popen) -> list:
    """The processes of its group and below it: dvc may be gone while its stage, or torchrun
    stopping its workers (which torch starts in sessions of their own), still runs."""
    import psutil

    found = {}
    for q in psutil.process_iter():
        try:
            if os.getpgid(q.pid) == proc.pid:
                found[q.pid] = q
                for c in q.children(recursive=True):
                    found[c.pid] = c
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return list(found.values())


def _running(procs: list) -> list:
    import psutil

    live = []
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                live.append(q)
        except psutil.Error:
            continue
    return live


def stop_all(interrupt_s: float = 10.0, terminate_s: float = 45.0) -> int:
    """Stop every running `dvc repro` with its stage, as a terminal's Ctrl-C would have done before they ran in
    groups of their own: SIGINT to each group (dvc lets its stage end, torchrun stops its workers), SIGTERM to what
    still runs after `interrupt_s`, SIGKILL after `terminate_s` more (longer than torchrun's own 30 s for its
    workers) to everything left, the workers included (found before the first signal: orphaned, they leave the
    group's tree). No `dvc repro` starts afterwards. Returns how many ran."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        procs = list(_RUNNING)
    seen = {proc.pid: _members(proc) for proc in procs}

    def left(proc: subprocess.Popen) -> list:
        return _running(seen[proc.pid] + _members(proc))

    for sig, wait_s in ((signal.SIGINT, interrupt_s), (signal.SIGTERM, terminate_s)):
        alive = [proc for proc in procs if left(proc)]
        for proc in alive:
            _signal_group(proc, sig)
        end = time.monotonic() + wait_s
        while any(left(proc) for proc in alive) and time.monotonic() < end:
            time.sleep(0.2)
    for proc in procs:
        for q in left(proc):
            try:
                q.kill()
            except Exception:  # gone meanwhile
                pass
    return len(procs)


def dvc_repro(stages: list[str], root: Path, env: dict[str, str], *, single: bool, tag: str) -> ArmResult:
    """One `dvc --wait-for-lock repro` of `stages`, its output prefixed with `tag`, in `env` on top of ours."""
    cmd = ["dvc", "--wait-for-lock", "repro", *(["--single-item"] if single else []), *stages]
    t0 = time.perf_counter()
    proc = start_logged(cmd, root, env)
    return ArmResult(" ".join(stages), finish_logged(proc, tag), time.perf_counter() - t0, env)


def start_logged(cmd: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` (printed first, with the wall-clock time) in `env` on top of ours, in a process group of its own
    registered for `stop_all`; SystemExit when the run is being stopped or the program is missing."""
    where = f" [{', '.join(f'{k}={v}' for k, v in env.items())}]" if env else ""
    _say(f"+ {time.strftime('%H:%M:%S')} {shlex.join(cmd)}{where}")
    bin_dir = str(Path(sys.executable).parent)
    full = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **env}
    full["PYTHONUNBUFFERED"] = "1"
    full[STUDY_PID_ENV] = str(os.getpid())  # every arm's runs under one study run: this process's
    with _RUNNING_LOCK:
        if _STOPPING.is_set():
            raise SystemExit("not started: the run is being stopped")
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
                start_new_session=True,  # its own process group: `stop_all` ends it with everything it started
            )
        except FileNotFoundError:
            raise SystemExit(f"error: {cmd[0]} is not installed in {bin_dir}") from None
        _RUNNING.add(proc)
    return proc


def finish_logged(proc: subprocess.Popen, tag: str, on_line: Callable[[str], None] | None = None) -> int:
    """Stream a `start_logged` process's output prefixed with `tag` (each line also to `on_line`) until it ends,
    then say when it ended (with the start line's time and the stages' own timestamps, where the time between a
    stage's last line and the next arm's start goes); its exit status."""
    _stream(proc, tag, on_line)  # interrupted here, it stays in _RUNNING for `stop_all`
    code = proc.wait()
    with _RUNNING_LOCK:
        _RUNNING.discard(proc)
    _say(f"[{tag}] ended {time.strftime('%H:%M:%S')}, exit {code}")
    return code


Runner = Callable[[list[str], Path, dict[str, str]], ArmResult]


def _dvc_arm(stages: list[str], root: Path, env: dict[str, str]) -> ArmResult:
    return dvc_repro(stages, root, env, single=True, tag=stages[0])


def run_arms(p: Plan, root: Path, *, runner: Runner = _dvc_arm, gap: float = 0.5) -> list[ArmResult]:
    """Every arm of `p` as its own `dvc repro --single-item` (`runner`), each started once the arms it needs
    (`p.needs`) have succeeded and a slot of its pool is free: train arms take `p.train_slots`; sample arms take
    `p.sample_slots`, or all run in `p.sample_slots[0]` when `p.sample_shared`; with `p.one_pool` both kinds
    take `p.train_slots`; shared sample arms run at most `p.arms_per_gpu` at once, one fewer while a train
    arm runs. An arm that needs a failed one is not started. Arms become ready in plan order
    (train arms first); consecutive starts are `gap` seconds apart, since DVC reads the pipeline under its lock
    and arms starting together only queue for it. Returns the results in plan order once every arm has ended."""
    t0 = time.perf_counter()
    train_pool = list(p.train_slots)
    sample_pool = train_pool if p.one_pool else None if p.sample_shared else list(p.sample_slots)
    is_train = set(p.train)

    def pool_of(stage: str) -> list[dict[str, str]] | None:  # None: no slot to wait for
        return train_pool if stage in is_train else sample_pool

    live = {"train": 0, "sample": 0}  # arms running now, of each kind

    def kind(stage: str) -> str:
        return "train" if stage in is_train else "sample"

    def gpus_full(stage: str) -> bool:  # a shared sample arm would put more than arms_per_gpu arms on a GPU
        return (
            p.sample_shared
            and kind(stage) == "sample"
            and live["sample"] + min(1, live["train"]) >= p.arms_per_gpu
        )

    finished: Queue[ArmResult] = Queue()

    def work(stage: str, env: dict[str, str], start: float) -> None:
        r = ArmResult(stage, 1, 0.0, env, start)  # what is recorded if the runner does not return
        try:
            r = runner([stage], root, env)
        except (Exception, SystemExit) as e:  # recorded as failed; the other arms go on
            _say(f"[{stage}] could not run: {e}")
        finally:  # always a result for this stage and this slot: the scheduler waits for one per started arm
            if not isinstance(r, ArmResult):
                r = ArmResult(stage, 1, 0.0, env)
            r.stage, r.slot, r.start = stage, env, start
            if not r.seconds:
                r.seconds = time.perf_counter() - t0 - start
            finished.put(r)

    pending = [*p.train, *p.sample]
    results: dict[str, ArmResult] = {}
    last_start: float | None = None  # consecutive starts `gap` apart, across passes of the loop
    while pending or any(live.values()):
        for stage in list(pending):
            needs = p.needs.get(stage, [])
            failed = [n for n in needs if n in results and results[n].returncode]
            if failed:  # never started: nothing of it to wait for
                pending.remove(stage)
                results[stage] = ArmResult(stage, 1, 0.0, {}, time.perf_counter() - t0, failed)
                continue
            pool = pool_of(stage)
            if any(n not in results for n in needs) or pool == [] or gpus_full(stage):
                continue
            env = pool.pop(0) if pool is not None else p.sample_slots[0]
            pending.remove(stage)
            if last_start is not None:
                time.sleep(max(0.0, gap - (time.perf_counter() - last_start)))
            last_start = time.perf_counter()
            threading.Thread(target=work, args=(stage, env, last_start - t0), daemon=True).start()
            live[kind(stage)] += 1
        if not any(live.values()):
            if pending:  # cannot happen (train arms need no arm, and an idle pool is full): say so if it does
                raise RuntimeError(f"arms {pending} can never start: {p}")
            break  # the last arms were not started: nothing left to wait for
        r = finished.get()
        live[kind(r.stage)] -= 1
        results[r.stage] = r
        pool = pool_of(r.stage)
        if pool is not None:
            pool.append(r.slot)
    return [results[s] for s in [*p.train, *p.sample]]


def summary(parts: list[tuple[str, list[ArmResult], float]]) -> str:
    """One line per `dvc repro` (its part, when it started within the part, how long, how it ended, its
    GPUs), then each part's wall time; for the arms also when the last train and the last sample arm ended."""
    lines = ["part       stage                     start s  seconds  status   devices"]
    for part, results, _ in parts:
        for r in results:
            gpus = r.slot.get("CUDA_VISIBLE_DEVICES", "-")
            start, secs = ("-", "-") if r.not_run else (f"{r.start:.1f}", f"{r.seconds:.1f}")
            lines.append(f"{part:<10} {r.stage[:25]:<25} {start:>7} {secs:>8}  {r.status:<8} {gpus}")
    walls = []
    for part, results, seconds in parts:
        wall = f"{part} {seconds:.1f} s"
        if part == "arms":
            ends = [
                f"the last {kind} arm ended at {max(ended):.1f} s"
                for kind, prefixes in (("train", TRAIN_ARMS), ("sample", SAMPLE_ARMS))
                if (
                    ended := [
                        r.start + r.seconds for r in results if _is(r.stage, prefixes) and not r.not_run
                    ]
                )
            ]
            wall += f" ({', '.join(ends)})" if ends else ""
        walls.append(wall)
    lines.append("wall time per part: " + ", ".join(walls))
    return "\n".join(lines)


def stale_stages(root: Path, graph: dict[str, set[str]]) -> set[str] | None:
    """The stages `dvc repro` would run: those `dvc status` reports changed and every stage below one of them;
    None when DVC cannot tell (then every stage counts as stale)."""
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            # `inputs` runs on every repro (always_changed) and reruns nothing when the files it hashes are the
            # same: counted only for another change (a changed data file is then not foreseen: no warm-up)
            changed = {s for s, why in repo.status().items() if any(w != "always changed" for w in why)}
    except Exception as e:  # a broken workspace fails in the stages themselves, with DVC's message
        _say(f"[warmup] dvc status failed ({e}): compiling ahead for every arm")
        return None
    return {s for s, below in graph.items() if s in changed or below & changed}


def warm_plan(parts: list[str], p: Plan, stale: set[str] | None) -> list[str]:
    """The warm-up parts (`cfg.engine.warmup.warm_parts`) that an out-of-date arm will use: `train` for the
    p_uncond train arms (not the guide: another network), `sample` for the sample arms. Nothing when every arm is
    up to date (a rerun that has nothing to do)."""

    def out_of_date(arms: list[str]) -> bool:
        return any(stale is None or a in stale for a in arms)

    keep = {"train": out_of_date([a for a in p.train if a != "train_guide"]), "sample": out_of_date(p.sample)}
    return [part for part in parts if keep[part]]


def repro_parallel(
    root: Path,
    targets: list[str],
    *,
    gpus: list[str] | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    # dotted key -> value, written into params.yaml as `dvc exp run -S` writes them (kept if the plan stands)
    overrides: dict | None = None,
    warmup: bool = True,  # CUDA: compile the arms' networks ahead, beside the upstream stages (cfg.engine.warmup)
) -> int:
    """The three parts of the module docstring; returns 0 when every `dvc repro` succeeded."""
    from cfg.engine.device import resolve_device
    from cfg.engine.warmup import warm_parts
    from cfg.io import load_yaml
    from cfg.study.config import ParamsError, params_from_dict
    from cfg.study.presets import dvc_applied

    params_file = root / "params.yaml"
    original = params_file.read_text()
    try:
        if overrides:  # applied and checked as DVC applies them (one code path with `cfg-lab exp run -S`)
            applied = dvc_applied(params_file, overrides)
            params = applied.params
        else:
            params = params_from_dict(load_yaml(original) or {})
        kind = resolve_device(params.train.device).type
        if overrides:  # the DAG's arms come from params.yaml (foreach over train.p_uncond): write them first
            params_file.write_text(applied.text)
        graph = stage_graph(root)
        p = plan(
            graph,
            targets=targets,
            kind=kind,
            train_devices=params.train.devices,
            sample_devices=params.sample.devices,
            gpus=gpus,
            jobs=jobs,
        )
        if warmup and (parts := warm_parts(params, kind)):
            p.warm = warm_plan(parts, p, stale_stages(root, graph))
            p.warm_env = {
                "train": {"CUDA_VISIBLE_DEVICES": p.everything["CUDA_VISIBLE_DEVICES"].split(",")[-1]},
                "sample": p.sample_slots[0],
            }
    except (ParamsError, ParallelError, RuntimeError) as e:
        params_file.write_text(original)  # refused: params.yaml as it was
        raise SystemExit(f"error: {e}") from None
    if dry_run:
        params_file.write_text(original)
        print(f"upstream: {' '.join(p.upstream) or '-'}  {p.everything or ''}")
        print(
            f"train arms: {' '.join(p.train)} in slots {[s.get('CUDA_VISIBLE_DEVICES', 'cpu') for s in p.train_slots]}"
        )
        mode = (
            f"sharing (at most {p.arms_per_gpu} arms on a GPU at once, a training model's included)"
            if p.sample_shared
            else "the train arms' slots"
            if p.one_pool
            else "in slots"
        )
        slots = [s.get("CUDA_VISIBLE_DEVICES", "cpu") for s in p.sample_slots]
        after = "; ".join(f"{s} after {' '.join(n)}" for s, n in p.needs.items() if n)
        print(f"sample arms: {' '.join(p.sample)} {mode} {slots}, each once it may start ({after})")
        if p.warm:
            where = ", ".join(
                f"{k} on GPU {e['CUDA_VISIBLE_DEVICES']}" for k, e in p.warm_env.items() if k in p.warm
            )
            print(
                f"warm-up: compile the {' and '.join(p.warm)} networks ahead ({where}) while the upstream stages "
                "after prepare run"
                + ("; the train arms start once the training step is compiled" if "train" in p.warm else "")
            )
        print(f"then: dvc repro {' '.join(targets)}".rstrip())
        return 0
    if overrides:
        _say(f"params.yaml: {len(overrides)} override(s) applied")

    def terminated(signum, frame):  # SIGTERM (a job scheduler, `kill`), SIGHUP (the terminal went): as Ctrl-C
        raise KeyboardInterrupt

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in stops}
    for sig in stops[1:]:
        signal.signal(sig, terminated)
    _STOPPING.clear()
    try:
        return _run_parts(p, root, targets)
    except KeyboardInterrupt:
        for sig in stops:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        try:  # `_say` does not raise for a hung-up terminal; whatever else happens, the arms are stopped
            _say("\ninterrupted: stopping the running dvc repro (each with its stage) ...")
        finally:
            n = stop_all()
        _say(
            f"interrupted: {n} running dvc repro stopped; what had finished is recorded in dvc.lock, so rerunning "
            "repeats only the rest",
        )
        return 130
    except Exception:  # the run's own error: no `dvc repro` outlives it either
        stop_all()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Warmup:
    """`cfg.engine.warmup`'s parts beside the upstream stages, all at once: the train part as one process, the
    sample part as one process per rank of a sample arm. `train_ready` is set once the train part has printed
    that its training step is compiled (`STEP_READY`; it goes on with the FID curve's graphs) or has ended, or
    when there is none, whatever its outcome: a failed warm-up only means that the arms compile for themselves."""

    def __init__(self, parts: list[str], root: Path, env: dict[str, dict[str, str]], t0: float):
        from cfg.engine.warmup import STEP_READY

        self.parts, self.root, self.env, self.t0 = parts, root, env, t0
        self.ready_line = STEP_READY
        self.results: list[ArmResult] = []
        self.train_ready = threading.Event()
        self.procs: list[tuple[str, subprocess.Popen]] = []  # (part, process)
        self.threads: list[threading.Thread] = []
        self._stopped = False
        self._lock = threading.Lock()  # processes start, or the warm-up is stopped, not both at once

    def command(self, part: str) -> list[str]:
        return [sys.executable, "-m", "cfg.engine.warmup", part, "--info", "data/prepared.json"]

    def jobs(self, part: str) -> list[tuple[str, list[str]]]:
        """(tag, command) of each process of a part: the sample part once per rank (its cache entries name the
        rank's device, cuda:R)."""
        if part != "sample":
            return [(f"warmup {part}", self.command(part))]
        n = len(self.env.get(part, {}).get("CUDA_VISIBLE_DEVICES", "0").split(","))
        return [
            (f"warmup {part} rank {r}", [*self.command(part), "--rank", str(r), "--world", str(n)])
            for r in range(n)
        ]

    def _watch(self, tag: str, proc: subprocess.Popen, env: dict[str, str], start: float, part: str) -> None:
        def on_line(line: str) -> None:
            if part == "train" and line.startswith(self.ready_line):
                self.train_ready.set()

        code = 1
        try:
            code = finish_logged(proc, tag, on_line)
        finally:
            end = time.perf_counter()
            self.results.append(ArmResult(tag, code, end - start, env, start - self.t0))
            if code and not self._stopped:
                _say(f"[{tag}] exit {code}: its arms compile for themselves")
            if part == "train":
                self.train_ready.set()

    def start(self) -> None:
        """Start every process (after prepare: they read its summary)."""
        if "train" not in self.parts:
            self.train_ready.set()
        with self._lock:
            for part in self.parts:
                env = self.env.get(part, {})
                for tag, cmd in self.jobs(part):
                    start = time.perf_counter()
                    try:
                        proc = start_logged(cmd, self.root, env)
                    except (Exception, SystemExit) as e:  # the study goes on without it
                        _say(f"[{tag}] could not start: {e}")
                        if part == "train":
                            self.train_ready.set()
                        continue
                    self.procs.append((part, proc))
                    thread = threading.Thread(
                        target=self._watch, args=(tag, proc, env, start, part), daemon=True
                    )
                    self.threads.append(thread)
                    thread.start()

    def stop(self, grace_s: float = 10.0, part: str | None = None) -> None:
        """End what still compiles (nothing needs it once the arms have ended, or the run stops), or only `part`'s
        processes: SIGTERM, then SIGKILL after `grace_s`."""
        with self._lock:
            if part is None:
                self._stopped = True
            live = [proc for name, proc in self.procs if part in (None, name) and proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while any(proc.poll() is None for proc in live) and time.monotonic() < end:
            time.sleep(0.1)
        for proc in live:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
        for thread in self.threads if part is None else []:
            thread.join(timeout=5)
        self.train_ready.set()


def _upstream(p: Plan, root: Path, warm: Warmup | None, t0: float) -> list[ArmResult]:
    """Part 1: the upstream stages in one `dvc repro`, or, with a warm-up, `prepare` first (the warm-up reads the
    data's shape from its summary), then the warm-up started beside the others."""
    upstream, done = list(p.upstream), []
    if warm is not None and "prepare" in upstream:
        upstream.remove("prepare")
        done.append(dvc_repro(["prepare"], root, p.everything, single=False, tag="upstream"))
        if done[0].returncode:
            return done
    if warm is not None:
        warm.start()
    if upstream:
        start = time.perf_counter() - t0
        done.append(dvc_repro(upstream, root, p.everything, single=False, tag="upstream"))
        done[-1].start = start
    return done


# how long the train arms wait for the warm-up's training step at most (a cold compile took ≈ 1.5-2.5 min on H100s
# and H200s with train.compile: true; max-autotune may take longer); then the train part is stopped and the arms
# compile for themselves, while the sampling ranks' part goes on
WARM_TRAIN_WAIT_S = 600.0


def _run_parts(p: Plan, root: Path, targets: list[str]) -> int:
    warm = Warmup(p.warm, root, p.warm_env, time.perf_counter()) if p.warm else None
    try:
        return _parts(p, root, targets, warm)
    finally:  # whatever ends the run (a failure, an interrupt): no warm-up outlives it
        if warm is not None:
            warm.stop()


def _parts(p: Plan, root: Path, targets: list[str], warm: Warmup | None) -> int:
    parts: list[tuple[str, list[ArmResult], float]] = []
    t0 = warm.t0 if warm is not None else time.perf_counter()
    done = _upstream(p, root, warm, t0)
    if done:
        parts.append(("upstream", done, time.perf_counter() - t0))
    failed_upstream = next((r for r in done if r.returncode), None)
    if failed_upstream is not None:  # _run_parts stops the warm-up
        _say(summary(parts))
        return failed_upstream.returncode
    if warm is not None and not warm.train_ready.is_set():
        t_wait = time.perf_counter()
        _say("[warmup] the train arms start once the training step is compiled ...")
        if not warm.train_ready.wait(WARM_TRAIN_WAIT_S):
            _say(f"[warmup] the training step not compiled after {WARM_TRAIN_WAIT_S:.0f} s: stopped")
            warm.stop(part="train")
        _say(f"[warmup] the arms waited {time.perf_counter() - t_wait:.1f} s for it")
    t1 = time.perf_counter()
    results = run_arms(p, root)
    arms_s = time.perf_counter() - t1
    if warm is not None:
        warm.stop()
        ends = [r.start + r.seconds for r in warm.results]
        parts.append(
            ("warmup", warm.results, max(ends) - min(r.start for r in warm.results) if ends else 0.0)
        )
    parts.append(("arms", results, arms_s))
    failed = [r.stage for r in results if r.returncode and not r.not_run]
    if failed:
        skipped = [r.stage for r in results if r.not_run]
        _say(summary(parts))
        _say(
            f"error: {', '.join(failed)} failed (output above)"
            + (f"; not started, as they need a failed arm: {', '.join(skipped)}" if skipped else "")
            + "; evaluate and the rest did not run. The arms that succeeded are recorded in dvc.lock, so rerunning "
            "repeats only the others",
        )
        return 1
    t1 = time.perf_counter()
    r = dvc_repro(targets, root, p.everything, single=False, tag="rest")
    parts.append(("rest", [r], time.perf_counter() - t1))
    _say(summary(parts))
    _say(f"total {time.perf_counter() - t0:.1f} s")
    return r.returncode
