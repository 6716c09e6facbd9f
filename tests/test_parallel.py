"""`cfg-lab repro --parallel`: which stage runs in which phase on which GPUs, and a real run of the arms side by
side through DVC on CPU that ends where a sequential `dvc repro` ends."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
import yaml

from cfg.study.parallel import ArmResult, ParallelError, plan, run_arms, summary

from .conftest import VENV_BIN, run, up_to_date

# the study's DAG as DVC gives it (stage -> every stage it depends on), three p_uncond and a guide network
P = ("0.1", "0.2", "0.5")
UP = {"prepare", "classifier", "reference"}
GRAPH = {
    "prepare": set(),
    "classifier": {"prepare"},
    "reference": {"prepare", "classifier"},
    "train_guide": {"prepare"},
    **{f"train@{p}": set(UP) for p in P},
    **{f"sample@{p}": UP | {f"train@{p}", "train_guide"} for p in P},
    "evaluate": UP | {f"train@{p}" for p in P} | {f"sample@{p}" for p in P} | {"train_guide"},
}
GPUS = ["0", "1", "2", "3"]


def cuda_plan(train_devices, sample_devices, gpus=GPUS):
    return plan(GRAPH, kind="cuda", train_devices=train_devices, sample_devices=sample_devices, gpus=gpus)


def test_train_arms_get_disjoint_gpus_and_sample_arms_share_all_of_them():
    p = cuda_plan(1, "all")
    assert p.upstream == sorted(UP)
    assert p.train == ["train_guide", "train@0.1", "train@0.2", "train@0.5"]  # the short guide job first
    assert p.sample == ["sample@0.1", "sample@0.2", "sample@0.5"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in p.train_slots] == GPUS  # one GPU each: 4 arms, 4 GPUs
    assert p.sample_shared and p.sample_slots == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}]
    assert p.everything == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}


def test_slots_follow_the_process_counts():
    p = cuda_plan(2, 1, gpus=["3", "5", "6", "7", "9"])
    assert [s["CUDA_VISIBLE_DEVICES"] for s in p.train_slots] == ["3,5", "6,7"]  # the fifth GPU is left over
    assert not p.sample_shared and [s["CUDA_VISIBLE_DEVICES"] for s in p.sample_slots] == [
        "3",
        "5",
        "6",
        "7",
        "9",
    ]
    assert cuda_plan("all", 2).train_slots == [{"CUDA_VISIBLE_DEVICES": g} for g in GPUS]  # all = the slot


def test_targets_run_only_the_arms_they_need():
    p = plan(GRAPH, targets=["sample@0.1"], kind="cpu", train_devices=1, sample_devices=1)
    assert p.train == ["train_guide", "train@0.1"] and p.sample == ["sample@0.1"]
    assert p.upstream == sorted(UP)
    with pytest.raises(ParallelError, match=r"no stage 'sample@0\.3' in dvc\.yaml; stages: classifier, "):
        plan(GRAPH, targets=["sample@0.3"], kind="cpu", train_devices=1, sample_devices=1)


def test_a_foreach_group_as_target_means_all_its_arms():
    """`dvc repro train` runs every train@<p>: so does `repro --parallel train` (its own help's example)."""
    p = plan(GRAPH, targets=["train"], kind="cpu", train_devices=1, sample_devices=1)
    assert p.train == [f"train@{q}" for q in P] and p.sample == [] and p.upstream == sorted(UP)
    p = plan(GRAPH, targets=["train", "sample"], kind="cpu", train_devices=1, sample_devices=1)
    assert p.train == ["train_guide", *(f"train@{q}" for q in P)] and p.sample == [f"sample@{q}" for q in P]
    with pytest.raises(
        ParallelError, match=r"no stage 'tra' in dvc\.yaml; .* \(or a group of them: sample, train\)"
    ):
        plan(GRAPH, targets=["tra"], kind="cpu", train_devices=1, sample_devices=1)


def test_a_group_target_through_the_command_and_dvc(tmp_path):
    project = tmp_path / "sleepy"
    _sleeping_project(project, ("0.1", "0.2", "0.5"))
    out = run([f"{VENV_BIN}/cfg-lab", "repro", "--parallel", "--dry-run", "train"], project)
    assert "train arms: train@0.1 train@0.2 train@0.5 " in out.stdout, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("then: dvc repro train")


def test_cpu_runs_arms_side_by_side_without_pinning():
    p = plan(GRAPH, kind="cpu", train_devices=1, sample_devices=1, jobs=2)
    assert p.train_slots == [{}, {}] and p.everything == {}
    assert (
        len(plan(GRAPH, kind="cpu", train_devices=1, sample_devices=1).train_slots) == 4
    )  # every arm at once


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"train_devices": 8, "sample_devices": 1},
            r"train\.devices = 8 but only 4 GPU\(s\) are given \(0,1,2,3\)",
        ),
        ({"train_devices": 1, "sample_devices": 5}, r"sample\.devices = 5 but only 4 GPU"),
        ({"train_devices": 1, "sample_devices": 1, "gpus": ["0", "0"]}, r"--gpus 0,0: give distinct GPUs"),
        ({"train_devices": 1, "sample_devices": 1, "gpus": []}, r"no GPU is visible"),
    ],
)
def test_impossible_settings_are_refused_before_any_stage(kwargs, message):
    with pytest.raises(ParallelError, match=message):
        plan(GRAPH, kind="cuda", **{"gpus": GPUS, **kwargs})


def test_arms_that_depend_on_each_other_are_refused():
    graph = {**GRAPH, "train@0.2": UP | {"train@0.1"}}
    with pytest.raises(ParallelError, match=r"stage train@0\.2 depends on \['train@0\.1'\]"):
        plan(graph, kind="cpu", train_devices=1, sample_devices=1)


class Arms:
    """A runner for `run_arms` that stands in for `dvc repro` (the real one runs in the slow test below): each
    arm sleeps its duration and ends with its exit code; the order of starts and ends, each arm's slot and how
    many arms ran at once are recorded."""

    def __init__(self, seconds: dict[str, float], exit_codes: dict[str, int] | None = None):
        self.seconds, self.exit_codes = seconds, exit_codes or {}
        self.events: list[tuple[str, str]] = []
        self.slots: dict[str, str] = {}
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, stages, root, env):
        (stage,) = stages
        with self.lock:
            self.events.append(("start", stage))
            self.slots[stage] = env.get("CUDA_VISIBLE_DEVICES", "cpu")
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds.get(stage, 0.05))
        with self.lock:
            self.events.append(("end", stage))
            self.now -= 1
        return ArmResult(stage, self.exit_codes.get(stage, 0), 0.0, env)

    def at(self, what: str, stage: str) -> int:
        return self.events.index((what, stage))


def test_an_arm_samples_as_soon_as_its_own_model_exists():
    """One GPU: the train arms queue for it one after another, and each sample arm starts when its model (and
    the guide) is done, beside the models still training, not after all of them."""
    p = cuda_plan(1, "all", gpus=["0"])
    arms = Arms({"train@0.1": 0.2, "train@0.2": 0.2, "train@0.5": 0.2})
    results = run_arms(p, None, runner=arms, gap=0)
    assert [r.stage for r in results] == p.train + p.sample and all(r.status == "ok" for r in results)
    trains = p.train
    for a, b in zip(trains, trains[1:], strict=False):  # one slot: never two train arms at once
        assert arms.at("end", a) < arms.at("start", b)
    for q in P:
        assert arms.at("start", f"sample@{q}") > arms.at("end", f"train@{q}")
        assert arms.at("start", f"sample@{q}") > arms.at("end", "train_guide")
    assert arms.at("start", "sample@0.1") < arms.at("end", "train@0.5")  # sampling beside training
    assert set(arms.slots.values()) == {"0"}
    starts = {r.stage: r.start for r in results}  # recorded offsets agree with the order seen
    assert starts["sample@0.1"] >= starts["train@0.1"] + 0.2


def test_a_failed_model_stops_only_its_own_arm():
    """One GPU, so the arm after the failed one needs the slot the failure gave back."""
    p = cuda_plan(1, "all", gpus=["0"])
    arms = Arms({}, exit_codes={"train@0.2": 3})
    results = {r.stage: r for r in run_arms(p, None, runner=arms, gap=0)}
    assert results["train@0.2"].status == "exit 3"
    assert results["sample@0.2"].not_run == ["train@0.2"] and results["sample@0.2"].status == "not run"
    assert ("start", "sample@0.2") not in arms.events  # never started
    assert all(results[s].status == "ok" for s in ("sample@0.1", "sample@0.5", "train@0.1", "train@0.5"))
    assert arms.slots["train@0.5"] == "0"
    table = summary([("arms", list(results.values()), 1.0)])
    assert "exit 3" in table
    # the last model fails: its sampling is the last arm left, not started, and the run ends there
    last = run_arms(p, None, runner=Arms({"train@0.5": 0.4}, exit_codes={"train@0.5": 1}), gap=0)
    assert [r.stage for r in last if r.not_run] == ["sample@0.5"]
    (line,) = [x for x in table.splitlines() if x.split()[1:2] == ["sample@0.2"]]
    assert line.split()[2:6] == ["-", "-", "not", "run"]  # no start or duration: it never ran


def test_a_runner_that_raises_or_a_failed_guide_is_recorded_and_stops_what_needs_it():
    class Raising(Arms):
        def __call__(self, stages, root, env):
            if stages == ["train@0.1"]:
                raise RuntimeError("dvc vanished")
            return super().__call__(stages, root, env)

    p = cuda_plan(1, "all", gpus=["0"])
    results = {r.stage: r for r in run_arms(p, None, runner=Raising({}), gap=0)}
    assert results["train@0.1"].status == "exit 1" and results["train@0.1"].slot == {
        "CUDA_VISIBLE_DEVICES": "0"
    }
    assert results["sample@0.1"].not_run == ["train@0.1"]
    assert results["sample@0.2"].status == results["sample@0.5"].status == "ok"
    results = run_arms(p, None, runner=Arms({}, exit_codes={"train_guide": 1}), gap=0)
    assert [r.stage for r in results if r.not_run] == p.sample  # every sample arm needs the guide


def test_cpu_arms_draw_on_one_pool_of_jobs_slots():
    """Three slots for train and sample arms together: the guide and the first model are quick, so their slots go
    to the last model and the first model's sampling while the second model still trains."""
    p = plan(GRAPH, kind="cpu", train_devices=1, sample_devices=1, jobs=3)
    arms = Arms({"train@0.2": 0.5, "train@0.5": 0.3})
    run_arms(p, None, runner=arms, gap=0)
    assert arms.most == 3  # three at a time, train and sample arms together
    assert arms.at("start", "sample@0.1") < arms.at("end", "train@0.2")
    assert all(arms.at("start", f"sample@{q}") > arms.at("end", f"train@{q}") for q in P)


def test_a_logged_process_says_when_it_started_and_ended(tmp_path, capsys):
    # the wall-clock times beside the stages' own timestamps: where the seconds between two arms go
    import re
    import sys

    from cfg.study.parallel import finish_logged, start_logged

    lines = []
    proc = start_logged([sys.executable, "-c", "print('one'); print('two')"], tmp_path, {"X": "1"})
    assert finish_logged(proc, "arm", lines.append) == 0
    assert lines == ["one\n", "two\n"], "each line to on_line too"
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\+ \d\d:\d\d:\d\d \S+ -c .+ \[X=1\]", err[0]), err[0]
    assert err[1:3] == ["[arm] one", "[arm] two"]
    assert re.fullmatch(r"\[arm\] ended \d\d:\d\d:\d\d, exit 0", err[3]), err[3]
    proc = start_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, {})
    assert finish_logged(proc, "bad") == 3 and capsys.readouterr().err.rstrip().endswith(", exit 3")


def test_consecutive_starts_are_gap_apart():
    p = plan(GRAPH, kind="cpu", train_devices=1, sample_devices=1)  # every train arm ready at once
    results = run_arms(p, None, runner=Arms({}), gap=0.15)
    starts = sorted(r.start for r in results)
    assert all(b - a >= 0.15 for a, b in zip(starts, starts[1:], strict=False)), starts


def test_sample_arms_in_slots_take_one_slot_each():
    p = cuda_plan(1, 2, gpus=["0", "1", "2", "3"])  # sample.devices: 2 -> slots 0,1 and 2,3
    arms = Arms(dict.fromkeys(p.sample, 0.1))
    run_arms(p, None, runner=arms, gap=0)
    assert {arms.slots[s] for s in p.sample} <= {"0,1", "2,3"}
    running: dict[str, str] = {}  # slot -> sample arm in it: never two in one slot
    for what, stage in arms.events:
        if stage in p.sample:
            slot = arms.slots[stage]
            if what == "start":
                assert slot not in running, f"{stage} started in {slot} beside {running.get(slot)}"
                running[slot] = stage
            else:
                del running[slot]


def test_shared_sample_arms_put_at_most_three_arms_on_a_gpu():
    """Six p_uncond on one GPU with `sample.devices: all`: the sample arms wait for their turn rather than all
    sharing the GPU, at most two beside the model in training and three once none trains."""
    ps = ("0.0", "0.05", "0.1", "0.2", "0.3", "0.5")
    graph = {"prepare": set(), "train_guide": {"prepare"}}
    for q in ps:
        graph[f"train@{q}"] = {"prepare"}
        graph[f"sample@{q}"] = {"prepare", f"train@{q}", "train_guide"}
    p = plan(graph, kind="cuda", train_devices=1, sample_devices="all", gpus=["0"])
    assert p.sample_shared
    arms = Arms({**{f"train@{q}": 0.3 for q in ps}, **{f"sample@{q}": 1.0 for q in ps}})
    results = run_arms(p, None, runner=arms, gap=0)
    assert all(r.status == "ok" for r in results)
    live: set[str] = set()
    most = {"beside a model": 0, "alone": 0}
    for what, stage in arms.events:
        (live.add if what == "start" else live.discard)(stage)
        samples = sum(s.startswith("sample@") for s in live)
        training = any(s.startswith("train") for s in live)
        key = "beside a model" if training else "alone"
        most[key] = max(most[key], samples)
    assert most == {"beside a model": 2, "alone": 3}, most


@pytest.mark.slow
def test_parallel_arms_end_where_a_sequential_repro_ends(project):
    """The arms side by side through real `dvc repro` processes on CPU: dvc.lock then records every stage
    (`dvc status` clean: no arm's record lost to another's), the results cover every p_uncond, the runs of all
    arms sit under one MLflow study run, and rerunning one arm alone with `dvc repro -f` gives the same weights
    and samples (the arms did not disturb each other)."""
    out = run([f"{VENV_BIN}/cfg-lab", "repro", "--parallel"], project)
    assert "wall time per part: upstream" in out.stderr and "rest" in out.stderr
    status = run(["dvc", "status"], project).stdout
    assert up_to_date(status), status
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for p in ("0.1", "0.5"):
        assert {f"train@{p}", f"sample@{p}"} <= set(lock)
    table = (project / "results/tradeoff.csv").read_text()
    assert "0.1," in table and "0.5," in table

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "cfg-lab"]
    runs = client.search_runs([exp.experiment_id], max_results=500)
    kinds = {r.data.tags.get("run_kind") for r in runs}
    studies = [r for r in runs if r.data.tags.get("run_kind") == "study"]
    assert len(studies) == 1, f"one study run for the whole parallel repro, got {len(studies)} ({kinds})"
    trains = [r for r in runs if r.data.tags.get("run_kind") == "train"]
    assert len(trains) == 2 and all(
        r.data.tags.get("mlflow.parentRunId") == studies[0].info.run_id for r in trains
    )

    before_w = torch.load(project / "models/p_uncond=0.5/checkpoint.pt", weights_only=True)["state_dict"]
    before_s = torch.load(project / "samples/p_uncond=0.5/samples.pt", weights_only=True)["images"]
    run(["dvc", "repro", "-f", "--single-item", "train@0.5", "sample@0.5"], project)
    after_w = torch.load(project / "models/p_uncond=0.5/checkpoint.pt", weights_only=True)["state_dict"]
    after_s = torch.load(project / "samples/p_uncond=0.5/samples.pt", weights_only=True)["images"]
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    assert torch.equal(before_s, after_s)
    assert json.loads((project / "results/metrics.json").read_text())


@pytest.mark.slow
def test_a_stopped_parallel_run_stops_its_arms_and_a_rerun_completes(project):
    """SIGTERM to `cfg-lab repro --parallel` while its models train (as a job scheduler or `kill` sends): every
    `dvc repro` it started ends with its stage, none is left running, and a rerun (DVC's locks of the killed
    arms are stale, not held) runs the study to the end."""
    import os
    import signal
    import subprocess

    import psutil

    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [f"{VENV_BIN}/cfg-lab", "repro", "--parallel", "-S", "train.steps=100000"]
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    me = psutil.Process(proc.pid)

    def live(procs: list) -> list:
        out = []
        for q in procs:
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    out.append(q)
            except psutil.Error:
                continue
        return out

    def models_training() -> list:  # the train@<p> stages (not the guide's, which ends at once)
        found = []
        for q in live(me.children(recursive=True)):
            try:
                line = " ".join(q.cmdline())
            except psutil.Error:
                continue
            if "pipelines/train.py" in line and "--p-uncond" in line:
                found.append(q)
        return found

    seen: dict[int, psutil.Process] = {}  # every process of the run, for the cleanup below

    def note_children() -> None:
        try:
            seen.update({q.pid: q for q in me.children(recursive=True)})
        except psutil.Error:
            pass

    try:
        deadline = time.monotonic() + 300
        while len(models_training()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            note_children()
            time.sleep(0.5)
        assert len(models_training()) == 2, "the two train arms never ran"
        time.sleep(2)  # into their training loops
        note_children()
        started = list(seen.values())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 130 and "running dvc repro stopped" in err, err
        time.sleep(1)
        left = live(started)
        assert not left, f"still running after the stop: {[q.cmdline() for q in left]}"
    finally:  # whatever failed above, nothing of this run outlives the test
        for q in live([me, *seen.values()]):
            q.kill()

    out = run([f"{VENV_BIN}/cfg-lab", "repro", "--parallel", "-S", "train.steps=30"], project)
    assert "wall time per part" in out.stderr
    assert up_to_date(run(["dvc", "status"], project).stdout)


def test_dry_run_plans_with_the_overrides_and_writes_nothing(project):
    before = (project / "params.yaml").read_text()
    out = run(
        [f"{VENV_BIN}/cfg-lab", "repro", "--parallel", "--dry-run", "-S", "sample.devices=all"], project
    )
    assert "train arms: train_guide train@0.1 train@0.5" in out.stdout
    assert (project / "params.yaml").read_text() == before
    bad = run([f"{VENV_BIN}/cfg-lab", "repro", "--parallel", "-S", "sample.devices=0"], project, check=False)
    assert bad.returncode != 0 and "sample.devices = 0 is not allowed" in bad.stderr
    assert (project / "params.yaml").read_text() == before  # refused before anything is written


class Recorder:
    """A stand-in for `dvc_repro` (the parts' and the arms' runs): records what ran when, fails on request."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail, self.calls, self.t0 = fail, [], time.perf_counter()

    def __call__(self, stages, root, env, *, single, tag):
        start = time.perf_counter() - self.t0
        time.sleep(0.05)
        self.calls.append((tuple(stages), start))
        code = 1 if set(stages) & set(self.fail) else 0
        return ArmResult(" ".join(stages), code, time.perf_counter() - self.t0 - start, env)

    def started(self, stage: str) -> float:
        return next(start for stages, start in self.calls if stage in stages)


def _warm_run(
    monkeypatch, tmp_path, *, warm_s=(0.6, 0.3), warm_rc=(0, 0), ready_s=None, fail=(), wait_s=None, arms=None
):
    """`_run_parts` of a 4-GPU plan with a warm-up whose parts are `sleep`s ending with `warm_rc`, the train part
    printing the warm-up's STEP_READY line (on stderr, as cfg.engine.warmup does) after `ready_s` when given;
    `wait_s` caps the arms' wait for it, `arms` replaces `run_arms`."""
    import sys

    from cfg.engine.warmup import STEP_READY
    from cfg.study import parallel

    rec = Recorder(fail)
    monkeypatch.setattr(parallel, "dvc_repro", rec)
    if wait_s is not None:
        monkeypatch.setattr(parallel, "WARM_TRAIN_WAIT_S", wait_s)
    if arms is not None:
        monkeypatch.setattr(parallel, "run_arms", arms)
    seconds = dict(zip(("train", "sample"), warm_s, strict=True))
    codes = dict(zip(("train", "sample"), warm_rc, strict=True))
    ready = {
        "train": f"time.sleep({ready_s}); print({STEP_READY!r} + ' in 0 s', file=sys.stderr, flush=True); "
        if ready_s is not None
        else ""
    }
    monkeypatch.setattr(
        parallel.Warmup,
        "command",
        lambda self, part: [
            sys.executable,
            "-c",
            f"import time, sys; {ready.get(part, '')}time.sleep({seconds[part]}); print('{part} compiled'); "
            f"sys.exit({codes[part]})",
        ],
    )
    p = cuda_plan(1, "all")
    p.warm = ["train", "sample"]
    p.warm_env = {"train": {"CUDA_VISIBLE_DEVICES": "3"}, "sample": p.sample_slots[0]}
    t0 = time.perf_counter()
    rc = parallel._run_parts(p, tmp_path, [])
    return rc, rec, time.perf_counter() - t0


def _warm_lines(err: str) -> dict[str, str]:
    """The summary's warm-up lines by stage (`warmup train`, `warmup sample rank 0`, …)."""
    lines = [line for line in err.splitlines() if line.startswith("warmup ")]
    return {" ".join(line.split()[1:3] if "train" in line else line.split()[1:5]): line for line in lines}


def test_the_warm_up_runs_beside_the_upstream_stages_and_the_train_arms_wait_for_its_training_step(
    monkeypatch, tmp_path, capsys
):
    rc, rec, _ = _warm_run(monkeypatch, tmp_path)
    assert rc == 0
    order = [stages for stages, _ in rec.calls]
    assert order[:2] == [("prepare",), ("classifier", "reference")], (
        "prepare alone first: the warm-up reads it"
    )
    # the upstream stages took ~0.1 s, the training step's warm-up 0.6 s: no train arm started before it ended
    first_train = min(rec.started(s) for s in ("train@0.1", "train@0.2", "train@0.5", "train_guide"))
    assert first_train >= 0.6 + rec.started("prepare")
    err = capsys.readouterr().err
    assert "[warmup train] train compiled" in err and "the arms waited" in err
    # the sampling network once per rank of a sample arm (its cache entries name the rank's device)
    assert all(f"[warmup sample rank {r}] sample compiled" in err for r in range(4))
    lines = _warm_lines(err)
    assert sorted(lines) == sorted(["warmup train", *(f"warmup sample rank {r}" for r in range(4))])
    assert " ok " in lines["warmup train"] and lines["warmup train"].rstrip().endswith(" 3"), (
        "on the last GPU"
    )
    samples = [lines[f"warmup sample rank {r}"] for r in range(4)]
    assert all(" ok " in x and x.rstrip().endswith(" 0,1,2,3") for x in samples), "on every GPU"


def test_the_train_arms_start_once_the_training_step_is_compiled_while_the_fid_curve_still_compiles(
    monkeypatch, tmp_path, capsys
):
    # the train part prints that its step is compiled after 0.6 s, then compiles the FID curve's graphs for 60 s:
    # the train arms start on the line, not on its end, and the part is ended with the run
    rc, rec, wall = _warm_run(monkeypatch, tmp_path, warm_s=(60, 0.1), ready_s=0.6)
    assert rc == 0 and wall < 30, "the arms did not wait for the FID curve's compilation"
    first_train = min(rec.started(s) for s in ("train@0.1", "train@0.2", "train@0.5", "train_guide"))
    assert first_train >= 0.6 + rec.started("prepare"), "not before the step was compiled"
    err = capsys.readouterr().err
    assert "[warmup train] [warmup] train: step compiled in 0 s" in err and "the arms waited" in err
    assert "not compiled after" not in err
    assert "exit -15" in _warm_lines(err)["warmup train"], "ended with the run"


def test_a_failed_warm_up_leaves_the_arms_to_compile_for_themselves(monkeypatch, tmp_path, capsys):
    rc, rec, _ = _warm_run(monkeypatch, tmp_path, warm_s=(0.1, 0.1), warm_rc=(3, 0))
    assert rc == 0, "the study does not depend on it"
    order = [stages for stages, _ in rec.calls]
    assert ("train@0.1",) in order and ("sample@0.5",) in order and order[-1] == (), "arms, then the rest"
    err = capsys.readouterr().err
    assert "[warmup train] exit 3: its arms compile for themselves" in err
    assert "exit 3" in _warm_lines(err)["warmup train"]


def test_a_failed_prepare_starts_no_warm_up_and_a_warm_up_outliving_the_arms_is_ended(
    monkeypatch, tmp_path, capsys
):
    rc, rec, _ = _warm_run(monkeypatch, tmp_path, fail=("prepare",))
    assert rc == 1 and [stages for stages, _ in rec.calls] == [("prepare",)]
    assert "warmup" not in capsys.readouterr().err, "nothing of it started"
    # a sample warm-up still compiling (60 s) when the arms end is stopped with them, not waited for
    rc, rec, wall = _warm_run(monkeypatch, tmp_path, warm_s=(0.1, 60))
    assert rc == 0 and wall < 30
    lines = [x for name, x in _warm_lines(capsys.readouterr().err).items() if "sample" in name]
    assert len(lines) == 4 and all("exit -15" in x for x in lines), lines


def test_the_arms_wait_for_the_warm_up_only_so_long(monkeypatch, tmp_path, capsys):
    from cfg.study import parallel

    run_arms = parallel.run_arms

    def slow_arms(p, root):  # the arms outlast the sampling ranks' part (2 s)
        time.sleep(3)
        return run_arms(p, root)

    rc, rec, wall = _warm_run(monkeypatch, tmp_path, warm_s=(60, 2), wait_s=0.5, arms=slow_arms)
    assert rc == 0 and wall < 30, "a warm-up that hangs is stopped and the arms run"
    err = capsys.readouterr().err
    assert "[warmup] the training step not compiled after" in err
    lines = _warm_lines(err)
    assert "exit -15" in lines["warmup train"]
    # only the train part was stopped: the sampling ranks' part compiled on to its end
    assert all(" ok " in lines[f"warmup sample rank {r}"] for r in range(4)), lines
    assert ("train@0.1",) in [stages for stages, _ in rec.calls]


def test_no_warm_up_outlives_a_run_that_ends_in_an_error(monkeypatch, tmp_path):
    import psutil

    def broken(p, root):  # e.g. the scheduler's own error, after the warm-up started
        raise RuntimeError("arms cannot start")

    before = {q.pid for q in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match="arms cannot start"):
        _warm_run(monkeypatch, tmp_path, warm_s=(0.1, 60), arms=broken)
    left = [q for q in psutil.Process().children(recursive=True) if q.pid not in before and q.is_running()]
    assert not [q for q in left if q.status() != psutil.STATUS_ZOMBIE], left


def _sleeping_project(root, p_uncond=("0.1", "0.5")):
    """A real DVC project whose train@<p> stages record their pid and sleep 300 s: arms that run until stopped."""
    import shutil
    import subprocess

    from .conftest import ROOT

    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(device="cpu", p_uncond=[float(p) for p in p_uncond])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = {"train": {"foreach": list(p_uncond), "do": {"cmd": "echo $$ >> pids; exec sleep 300"}}}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run([f"{VENV_BIN}/dvc", "init", "-q", "--no-scm"], cwd=root, check=True)


@pytest.mark.slow
def test_a_hung_up_terminal_stops_every_arm(tmp_path):
    """`cfg-lab repro --parallel` in a real terminal (a pty, the process its session leader) that goes away, as a
    closed window or a dropped ssh connection: SIGHUP, and every write to the terminal fails (EIO). The arms run
    in sessions of their own, so no SIGHUP reaches them: the command must stop them, although it cannot say so."""
    import os
    import pty
    import select
    import signal

    import psutil

    project = tmp_path / "sleepy"
    _sleeping_project(project)
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: cfg-lab on the pty's slave, its controlling terminal
        try:
            os.chdir(project)
            os.execve(f"{VENV_BIN}/cfg-lab", ["cfg-lab", "repro", "--parallel"], env)
        finally:
            os._exit(127)
    pids = project / "pids"
    seen: dict[int, psutil.Process] = {}  # cfg-lab's processes: its dvc repro and their stages
    out = b""
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
        ):  # read the terminal (a full one would block cfg-lab) until both sleep
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
            try:
                seen.update({q.pid: q for q in psutil.Process(pid).children(recursive=True)})
            except psutil.Error:
                pass
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
        stages = [int(x) for x in pids.read_text().split()] if pids.exists() else []
        assert len(stages) == 2, f"the two arms never ran:\n{out.decode(errors='replace')}"
        seen.update({q: psutil.Process(q) for q in stages})
        assert all("sleep" in seen[q].name() for q in stages)
        os.close(fd)  # the terminal goes away: the kernel sends SIGHUP to its session leader, cfg-lab
        fd = -1
        deadline = time.monotonic() + 90  # stop_all: SIGINT, which ends a sleep at once (at most 10 + 45 s)
        status = None
        while status is None and time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else None
            time.sleep(0.2)
        assert status is not None, "cfg-lab did not end after SIGHUP"
        left = [q for q in seen.values() if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"still running after SIGHUP: {[q.cmdline() for q in left]}"
        assert os.waitstatus_to_exitcode(status) == 130, os.waitstatus_to_exitcode(status)
    finally:  # whatever failed above, nothing of this run outlives the test
        if fd >= 0:
            os.close(fd)
        for q in [*seen.values()]:
            try:
                q.kill()
            except psutil.Error:
                pass
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
