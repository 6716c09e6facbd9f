"""`cfg-lab repro --parallel`: which stage runs in which phase on which GPUs, and a real run of the arms side by
side through DVC on CPU that ends where a sequential `dvc repro` ends."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cfg.study.parallel import ParallelError, plan

from .conftest import VENV_BIN, run

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


@pytest.mark.slow
def test_parallel_arms_end_where_a_sequential_repro_ends(project):
    """Every arm at once through real `dvc repro` processes on CPU: dvc.lock then records every stage
    (`dvc status` clean: no arm's record lost to another's), the results cover every p_uncond, the runs of all
    arms sit under one MLflow study run, and rerunning one arm alone with `dvc repro -f` gives the same weights
    and samples (the arms did not disturb each other)."""
    out = run([f"{VENV_BIN}/cfg-lab", "repro", "--parallel"], project)
    assert "wall time per phase: upstream" in out.stderr and "rest" in out.stderr
    status = run(["dvc", "status"], project).stdout
    assert "Data and pipelines are up to date" in status, status
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
