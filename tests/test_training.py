"""Resumable training: an interrupted run continued from its resume state ends bitwise where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from cfg.data.datasets import load_dataset
from cfg.engine.training import OtherCodeState, resume_state_path, train_diffusion
from cfg.io import atomic_save
from cfg.nets.unet import UNetConfig, load_checkpoint
from tests.conftest import VENV_BIN, run, shrink_params

# dropout > 0: the global RNG, not only the training generator, must be restored
TINY = UNetConfig(
    image_size=8,
    in_channels=1,
    num_classes=10,
    base_width=8,
    channel_mult=(1, 2),
    attention_resolutions=(4,),
    dropout=0.1,
    head_channels=8,
)
KW = dict(
    p_uncond=0.2, steps=30, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.999, seed=3, log_every=10
)


class Stop(Exception):
    pass


def _stop_at(step: int):
    def callback(entry: dict) -> None:
        if entry["step"] == step:
            raise Stop

    return callback


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not unequal, f"tensors differ: {unequal}"


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", image_size=8)
    return ds.train_x[:300], ds.train_y[:300]


def test_stopped_and_resumed_training_equals_an_uninterrupted_run_bitwise(digits, tmp_path):
    whole = train_diffusion(TINY, *digits, **KW)
    state = tmp_path / "state.pt"
    # checkpoints at 8 and 16 (mid-interval: the loss accumulator travels in the state); stopped in the
    # callback of step 20, which runs before the step-24 checkpoint, so the run goes back to step 16
    with pytest.raises(Stop):
        train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=8, callback=_stop_at(20))
    assert state.is_file() and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert torch.load(state, weights_only=True)["step"] == 16
    resumed = train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=8)
    assert resumed.resumed_from == 16 and whole.resumed_from == 0
    _assert_same_weights(resumed.model, whole.model)
    _assert_same_weights(resumed.ema, whole.ema)
    assert [(h["step"], h["loss"]) for h in resumed.history] == [
        (h["step"], h["loss"]) for h in whole.history
    ]


def test_a_resume_state_of_other_settings_is_refused(digits, tmp_path):
    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=5, callback=_stop_at(10))
    with pytest.raises(ValueError, match=r"other settings \(\['seed'\]\)"):
        train_diffusion(TINY, *digits, **{**KW, "seed": 4}, resume_path=state, checkpoint_every=5)
    with pytest.raises(ValueError, match="needs a resume_path"):
        train_diffusion(TINY, *digits, **KW, checkpoint_every=10)


def test_a_resume_state_of_other_code_is_refused_unless_asked_and_then_named(digits, tmp_path):
    """DVC reruns a train stage when its code changes: a state an interrupted run of the old code left must not be
    continued silently (one model, two versions of the training code). Asked to, the run continues and names the
    files, through later states too; a state from before code hashes were kept counts as other code."""
    state = tmp_path / "state.pt"
    old = {"cfg/maths/diffusion.py": "0" * 16, "pipelines/train.py": "1" * 16}
    new = {**old, "cfg/maths/diffusion.py": "2" * 16}
    with pytest.raises(Stop):
        train_diffusion(
            TINY, *digits, **KW, resume_path=state, checkpoint_every=5, callback=_stop_at(10), code=old
        )
    assert torch.load(state, weights_only=True)["code"] == old
    kept = state.read_bytes()
    with pytest.raises(OtherCodeState, match=r"written by other code \(changed: cfg/maths/diffusion\.py\)"):
        train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=5, code=new)
    assert state.read_bytes() == kept, "the refused state is left as it was"
    with pytest.raises(Stop):  # continued knowingly, stopped again after a later state was written
        train_diffusion(
            TINY,
            *digits,
            **KW,
            resume_path=state,
            checkpoint_every=5,
            code=new,
            resume_other_code=True,
            callback=_stop_at(20),
        )
    later = torch.load(state, weights_only=True)
    assert later["step"] == 15 and later["code"] == new and later["other_code"] == ["cfg/maths/diffusion.py"]
    done = train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=5, code=new)
    assert done.resumed_from == 15 and done.resumed_other_code == ["cfg/maths/diffusion.py"]
    whole = train_diffusion(TINY, *digits, **KW)  # the "code" here is the same: the same weights
    _assert_same_weights(done.model, whole.model)
    assert whole.resumed_other_code == []

    legacy = {k: v for k, v in later.items() if k not in ("code", "other_code")}
    atomic_save(legacy, state)
    with pytest.raises(OtherCodeState, match="a state from before code hashes were kept"):
        train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=5, code=new)
    assert train_diffusion(TINY, *digits, **KW, resume_path=state, checkpoint_every=5).resumed_from == 15, (
        "a caller that passes no code resumes as before"
    )


def test_stage_code_hashes_the_python_deps_of_a_stage(tmp_path):
    """The code a resume state keeps: the .py files among the stage's deps in dvc.yaml (foreach stages by name)."""
    import shutil

    import yaml

    from cfg.study.stage import stage_code
    from tests.conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "train_guide"):
        deps = stages[name].get("do", stages[name])["deps"]
        code = stage_code(name, ROOT)
        assert sorted(code) == sorted(d for d in deps if d.endswith(".py")) and "pipelines/train.py" in code
        assert all(len(h) == 16 for h in code.values())
    for rel in ["dvc.yaml", *stage_code("train", ROOT)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    before = stage_code("train", tmp_path)
    assert before == stage_code("train", ROOT)
    with open(tmp_path / "cfg/maths/diffusion.py", "a") as f:
        f.write("# a comment is a change to DVC too\n")
    after = stage_code("train", tmp_path)
    assert [k for k in before if before[k] != after[k]] == ["cfg/maths/diffusion.py"]
    with pytest.raises(KeyError, match="no stage 'trian'"):
        stage_code("trian", ROOT)


def test_resume_path_names_every_result_changing_setting(tmp_path):
    base = dict(
        p_uncond=0.1,
        data_fingerprint="abc",
        model={"base_width": 32},
        train={"p_uncond": [0.1, 0.5], "lr": 2e-3, "checkpoint_every": 500, "device": "auto"},
        device=torch.device("cpu"),
    )
    path = resume_state_path(tmp_path, **base)
    assert path.parent.parent == tmp_path / ".resume" and path.name == "state.pt"
    assert path.parent.name.startswith("train-p_uncond=0.1-")
    # how often states are written, and the p_uncond list (not this model's), do not change the result
    same = {"checkpoint_every": 100, "p_uncond": [0.1, 0.2], "device": "cpu"}
    assert resume_state_path(tmp_path, **{**base, "train": {**base["train"], **same}}) == path
    changed = [
        {"p_uncond": 0.5},
        {"data_fingerprint": "abd"},
        {"model": {"base_width": 64}},
        {"train": {**base["train"], "lr": 1e-3}},
        {"device": torch.device("cuda")},
        {"world": 2},  # train.devices: all on another machine
    ]
    for change in changed:
        assert resume_state_path(tmp_path, **{**base, **change}) != path, change
    assert resume_state_path(tmp_path, **base, world=1) == path  # one process: the path it always had
    assert resume_state_path(tmp_path, **base, world=2) != resume_state_path(tmp_path, **base, world=4)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("unpicklable")  # fails the write after part of the file is out


def test_a_failed_state_write_keeps_the_old_state_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="unpicklable"):
        atomic_save({"step": 2, "model": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def _train_stage(project, out: str) -> list[str]:
    return [
        f"{VENV_BIN}/python",
        "pipelines/train.py",
        "--p-uncond",
        "0.1",
        "--data",
        "data/prepared.pt",
        "--out-dir",
        out,
    ]


def _mlflow_runs(project) -> list[tuple[str, str]]:
    """(name, status) of every run in the project's MLflow store (SQLite)."""
    import sqlite3

    with sqlite3.connect(project / "mlflow.db") as con:
        return sorted(con.execute("select name, status from runs").fetchall())


@pytest.mark.slow
def test_killed_train_stage_resumes_and_ends_at_the_uninterrupted_weights(project, monkeypatch):
    settings = {"steps": 120, "batch_size": 32, "log_every": 10, "checkpoint_every": 20, "eval_every": 0}
    shrink_params(project / "params.yaml", {"train": settings})
    run(
        [
            f"{VENV_BIN}/python",
            "pipelines/prepare.py",
            "--out",
            "data/prepared.pt",
            "--info",
            "data/prep.json",
        ],
        project,
    )
    run(_train_stage(project, "models/whole"), project)
    resume_root = project / ".resume"
    assert not any(resume_root.glob("*/state.pt")), "a finished run removes its resume state"

    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        _train_stage(project, "models/killed"),
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not any(resume_root.glob("*/state.pt")):
        assert proc.poll() is None, (
            f"the run ended before its first checkpoint: {proc.stderr.read().decode()}"
        )
        assert time.monotonic() < deadline, "no resume state appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (project / "models" / "killed" / "checkpoint.pt").exists()
    (state,) = resume_root.glob("*/state.pt")
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 20 <= killed_at < 120

    # after an edit of the stage's code (a dep in dvc.yaml) the state is refused, naming the file, and kept
    diffusion = project / "cfg" / "maths" / "diffusion.py"
    diffusion.write_text(diffusion.read_text() + "\n# an edit: DVC reruns the stage for it\n")
    runs_before = _mlflow_runs(project)
    refused = run(_train_stage(project, "models/killed"), project, check=False)
    assert refused.returncode != 0
    assert _mlflow_runs(project) == runs_before, "refused before its MLflow run started"
    assert "written by other code (changed: cfg/maths/diffusion.py)" in refused.stderr, refused.stderr
    assert "or continue it knowingly (CFG_LAB_RESUME_OTHER_CODE=1 dvc repro)" in refused.stderr
    assert torch.load(state, weights_only=True)["step"] == killed_at

    # continued knowingly, also with another checkpoint_every (it does not change the result); the edit is a
    # comment, so the weights are still the uninterrupted run's, and train.json names the file that changed
    monkeypatch.setenv("CFG_LAB_RESUME_OTHER_CODE", "1")
    shrink_params(project / "params.yaml", {"train": {"checkpoint_every": 30}})
    rerun = run(_train_stage(project, "models/killed"), project)
    resumed_at = int(rerun.stderr.split("resumed from step ")[1].split()[0])  # a log record (stderr)
    assert resumed_at == killed_at
    assert not resume_root.exists() or not any(resume_root.iterdir())
    meta = json.loads((project / "models" / "killed" / "train.json").read_text())
    assert meta["resumed_other_code"] == ["cfg/maths/diffusion.py"]
    assert "resumed_other_code" not in json.loads((project / "models" / "whole" / "train.json").read_text())

    whole, _ = load_checkpoint(project / "models" / "whole" / "checkpoint.pt")
    killed, _ = load_checkpoint(project / "models" / "killed" / "checkpoint.pt")
    _assert_same_weights(killed, whole)
    loss = [(project / "models" / d / "loss.csv").read_text() for d in ("whole", "killed")]
    assert loss[0] == loss[1]


def test_compiled_update_equals_the_eager_update():
    """GraphStep.update (gradient clipping, Adam, the EMA) through torch.compile, as train.cuda_graph runs it with a
    compiled network, takes the steps of the eager update: the same weights, Adam moments and EMA after five steps
    with clipping active, up to float rounding (Inductor's kernels against torch's foreach ones)."""
    from cfg.engine.training import GraphStep
    from cfg.nets.unet import EMA, UNet

    config = UNetConfig(
        image_size=8, base_width=8, channel_mult=(1,), attention_resolutions=(), head_channels=8
    )
    steps = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = UNet(config)
        init = [p.detach().clone() for p in model.parameters()]
        # (a tensor lr, as train.cuda_graph's, needs capturable=True: CUDA only)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)
        ema = EMA(model, 0.9, warmup=True)
        step = GraphStep(model, model, opt, ema, torch.zeros(()), 0.5, False, compile_update=compiled)
        for t in range(5):
            for p in model.parameters():
                p.grad = torch.randn_like(p)  # norm ≫ 0.5: clipping scales every step
            step.decay.fill_(ema.decay_at(t))
            step.update()
        steps.append((model, opt, ema))
    (model_a, opt_a, ema_a), (model_b, opt_b, ema_b) = steps
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b.state[q][key], opt_a.state[p][key], rtol=1e-5, atol=1e-8)
    for p, q in zip(ema_a.model.parameters(), ema_b.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, q) for p, q in zip(model_b.parameters(), init, strict=True))


def test_history_logs_the_learning_rate_each_step_trained_with(digits):
    """Step s of the linear warm-up trains at lr · min(1, s / warmup_steps) (LambdaLR: the factor of s − 1, counted
    from 0); the history gives that rate, not the next step's, which the scheduler holds once the step is done."""
    kw = KW | {"steps": 7, "warmup_steps": 4, "log_every": 1}
    result = train_diffusion(TINY, *digits, **kw)
    lr = kw["lr"]
    assert [h["step"] for h in result.history] == list(range(1, 8))
    assert [h["lr"] for h in result.history] == pytest.approx([lr * min(1.0, s / 4) for s in range(1, 8)])
