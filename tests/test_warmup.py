"""Compiling ahead (cfg.engine.warmup): the networks the warm-up runs are those the stages run, call for call and
in the same order, so that torch.compile's caches it fills are the ones the stages look up; and `cfg-lab repro
--parallel` plans it only where something will compile.

torch.compile runs on CUDA only, so on this CPU the tests compare what a compiled graph depends on, as far as the
CPU shows it: the network's configuration, train/eval mode, whether its weights take gradients, whether autograd
records, each input's shape, dtype and memory layout, and the order in which a process first meets each such
call (Dynamo makes a batch dimension dynamic once a process has seen it change, so a graph depends on the graphs
compiled before it in that process). Whether the GPU then hits the cache is for a GPU to measure (README
"Several GPUs")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cfg.data.datasets import load_dataset
from cfg.data.images import to_uint8
from cfg.engine import warmup
from cfg.engine.generate import sample_checkpoint, sampling_kwargs
from cfg.engine.scoring import score_model
from cfg.engine.training import train_diffusion, train_kwargs
from cfg.eval.features import classifier_extractor, extract_features
from cfg.eval.stats import reference_stats
from cfg.nets.classifier import Classifier, ClassifierConfig
from cfg.nets.unet import UNet, load_checkpoint, save_checkpoint
from cfg.study.config import params_from_dict
from cfg.study.parallel import Plan, warm_plan
from tests.conftest import ROOT, TINY


def _params(**sections):
    """The project's params.yaml with the tests' tiny sizes, then `sections` on top."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for over in (TINY, sections):
        for section, values in over.items():
            raw.setdefault(section, {}).update(values)
    return params_from_dict(raw)


class Calls:
    """Every distinct U-Net forward while open, in the order first met: what a compiled graph depends on, as far as
    the CPU shows it."""

    def __enter__(self):
        self.seen: list[tuple] = []

        def hook(module, args):
            if isinstance(module, UNet):
                weight = next(module.parameters())
                call = (
                    json.dumps(module.config.to_dict(), sort_keys=True),
                    module.training,
                    weight.requires_grad,
                    torch.is_grad_enabled(),
                    tuple(
                        (tuple(a.shape), a.dtype, a.is_contiguous(memory_format=torch.channels_last))
                        for a in args
                    ),
                )
                if call not in self.seen:
                    self.seen.append(call)

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _info(ds) -> dict:
    return {"image_size": ds.image_size, "channels": ds.channels, "classes": ds.classes}


def _stage_calls(params, ds, tmp_path: Path) -> dict[str, list[tuple]]:
    """The U-Net calls of the train stage's process (its step, then its FID curve) and of the sample stage's,
    in order, through the functions the stages call, on the digits."""
    t = params.train
    config = warmup.unet_config(params, _info(ds))
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(in_channels=1, num_classes=10, image_size=8, width=8, feature_dim=16))
    ext = classifier_extractor(clf.eval())
    ref = reference_stats(extract_features(ext, to_uint8(ds.test_x)), ext)
    curve = []

    def fid_curve(entry: dict) -> None:  # pipelines/train.py's training_curve at eval_every
        if entry["step"] == 2:
            curve.append(
                score_model(
                    entry["ema"],
                    [0.0, t.eval_w],
                    t.eval_samples,
                    extractor=ext,
                    reference=ref,
                    sampling=sampling_kwargs(params),
                )
            )

    with Calls() as train:
        result = train_diffusion(
            config,
            ds.train_x,
            ds.train_y,
            p_uncond=t.p_uncond[0],
            device="cpu",
            **train_kwargs(t) | {"steps": 2},
            log_every=1,
            callback=fid_curve,
        )
    assert curve, "the FID curve ran"
    save_checkpoint(tmp_path / "checkpoint.pt", result.ema, {"p_uncond": 0.1, "classes": ds.classes})
    model, meta = load_checkpoint(tmp_path / "checkpoint.pt")
    with Calls() as sample:
        sample_checkpoint(model, meta, params, checkpoint="checkpoint.pt", device="cpu")
    return {"train": train.seen, "sample": sample.seen}


def _warm_calls(params, ds) -> dict[str, list[tuple]]:
    config = warmup.unet_config(params, _info(ds))
    with Calls() as train:
        warmup.warm_train(params, config, torch.device("cpu"))
    with Calls() as sample:
        warmup.warm_sample(params, config, torch.device("cpu"))
    return {"train": train.seen, "sample": sample.seen}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8, max_train=300, max_test=100)


# n_samples 60 is not a multiple of the 40 examples a batch of 120 rows holds at 3 w: the sample stage's last
# batch is shorter (another shape), and the warm-up must meet it too, after a full one (60 and 140: multiples of the
# 20 that 2 seed ranges of digits' 10 classes need)
CELL = {"w": [-1.0, 0.0, 1.0], "steps": 3, "n_samples": 60, "batch_size": 120}


def test_the_warm_up_runs_the_networks_the_train_and_sample_stages_run_in_their_order(digits, tmp_path):
    params = _params(sample=CELL)
    stage, warm = _stage_calls(params, digits, tmp_path), _warm_calls(params, digits)
    kinds = [(training, grad) for _, training, _, grad, _ in stage["train"]]
    assert kinds[0] == (True, True) and set(kinds[1:]) == {(False, False)}, "the step, then the FID curve"
    assert len(stage["sample"]) == 2, "a full batch, then the short last one"
    assert warm == stage


def test_the_train_part_says_its_step_is_compiled_before_it_compiles_the_fid_curve(digits):
    # the train arms start on `ready`: every training call must come before it, and only the FID curve's after
    params = _params(sample=CELL)
    config = warmup.unet_config(params, _info(digits))
    with Calls() as calls:
        at: list[int] = []
        warmup.warm_train(params, config, torch.device("cpu"), ready=lambda: at.append(len(calls.seen)))
    assert len(at) == 1, "once"
    kinds = [(training, grad) for _, training, _, grad, _ in calls.seen]
    assert 0 < at[0] < len(kinds), "between the two"
    assert set(kinds[: at[0]]) == {(True, True)} and set(kinds[at[0] :]) == {(False, False)}
    # without a FID curve the part ends with the step; `ready` still comes
    with Calls() as calls:
        at = []
        no_curve = _params(sample=CELL, train={"eval_every": 0})
        warmup.warm_train(no_curve, config, torch.device("cpu"), ready=lambda: at.append(len(calls.seen)))
    assert at == [len(calls.seen)] and {training for _, training, *_ in calls.seen} == {True}


def test_with_several_guidance_methods_and_one_whose_passes_change_with_the_step(digits, tmp_path):
    # interval guidance runs the unconditional pass only inside its λ interval: the batch the network sees
    # changes during sampling, at steps that a shortened schedule would not reach
    # (interval first: with CFG first, CFG's full passes would already have met every shape interval meets)
    guidance = {"interval": {"method": "interval", "lambda_lo": -2.0, "lambda_hi": 2.0}, "cfg": {}}
    params = _params(sample=CELL | {"steps": 8, "guidance": guidance})
    stage, warm = _stage_calls(params, digits, tmp_path), _warm_calls(params, digits)
    assert len(stage["sample"]) > 2, "interval's partial passes are other shapes"
    assert warm["sample"] == stage["sample"]


@pytest.mark.parametrize(("n_samples", "world"), [(60, 2), (140, 2), (140, 4), (40, 3)])
def test_each_sampling_rank_is_warmed_with_the_batches_of_its_own_shard(
    digits, tmp_path, monkeypatch, n_samples, world
):
    """Under torchrun rank r claims whole batches of 40 examples (here) on cuda:r, any rank any full batch, and
    only the rank holding the cell's short last batch (its `shard` rank) meets that shape, after its full ones.
    Each rank's warm-up process meets the shapes its rank meets, in its order. Each rank runs alone here (a process
    group of one, so that its claims come from a real store): it claims every full batch, as a rank may."""
    import torch.distributed as dist

    import cfg.engine.generate as generate
    from cfg.engine.distributed import Dist

    # no peers to gather from
    monkeypatch.setattr(generate, "gather_rows", lambda t, d, n, dim=0, block=1, rows=None: t)
    params = _params(sample=CELL | {"n_samples": n_samples})
    config = warmup.unet_config(params, _info(digits))
    model = UNet(config).eval()
    for rank in range(world):
        d = Dist(rank, world, rank)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            with Calls() as stage:
                sample_checkpoint(
                    model,
                    {"p_uncond": 0.1, "classes": digits.classes},
                    params,
                    checkpoint="c",
                    device="cpu",
                    dist=d,
                )
        finally:
            dist.destroy_process_group()
        with Calls() as warm:
            warmup.warm_sample(params, config, torch.device("cpu"), d)
        assert warm.seen == stage.seen, (n_samples, world, rank)
        short = n_samples % 40 and (n_samples // 40) % world == rank
        assert len(stage.seen) == 1 + bool(short), "a full batch, and the short one on its rank only"


def test_the_comparison_can_fail_on_another_batch_shape(digits, tmp_path):
    stage = _stage_calls(_params(sample=CELL), digits, tmp_path)
    other = _warm_calls(_params(sample=CELL | {"batch_size": 60}), digits)
    assert other["train"] != stage["train"], "the FID curve samples in batches of sample.batch_size rows too"
    assert other["sample"] != stage["sample"]


def test_what_is_compiled_ahead_where():
    params = _params(train={"compile": True, "devices": 1}, sample={"compile": True})
    assert warmup.warm_parts(params, "cpu") == [], "nothing compiles on CPU"
    assert warmup.warm_parts(params, "cuda") == ["train", "sample"]
    assert warmup.warm_parts(_params(train={"compile": True, "devices": "all"}), "cuda")[0] == "train"
    assert "train" not in warmup.warm_parts(_params(train={"compile": True, "devices": 2}), "cuda"), "DDP"
    assert warmup.warm_parts(_params(train={"compile": False}, sample={"compile": False}), "cuda") == []
    curve_only = _params(train={"compile": False, "eval_every": 100}, sample={"compile": True})
    assert warmup.warm_parts(curve_only, "cuda") == ["train", "sample"], "the FID curve's sampling compiles"
    no_curve = _params(train={"compile": False, "eval_every": 0}, sample={"compile": True})
    assert warmup.warm_parts(no_curve, "cuda") == ["sample"]


def test_the_warm_up_is_planned_only_for_arms_that_will_run():
    p = Plan(
        ["prepare"],
        ["train_guide", "train@0.1", "train@0.5"],
        ["sample@0.1", "sample@0.5"],
        [{}],
        [{}],
        True,
    )
    both = ["train", "sample"]
    assert warm_plan(both, p, None) == both, "unknown status: every arm counts as out of date"
    assert warm_plan(both, p, set()) == [], "a rerun with nothing to do compiles nothing"
    assert warm_plan(both, p, {"train@0.5", "sample@0.5"}) == both
    assert warm_plan(both, p, {"sample@0.1"}) == ["sample"]
    assert warm_plan(both, p, {"train_guide"}) == [], "the guide is another network"
    assert warm_plan(both, p, {"train@0.1"}) == ["train"], "the FID curve is the train part's"


def test_on_cpu_the_module_is_a_no_op_that_says_so(tmp_path, digits, capsys):
    (tmp_path / "prepared.json").write_text(json.dumps(_info(digits)))
    assert warmup.main(["train", "--info", str(tmp_path / "prepared.json")]) == 0
    assert "nothing is compiled ahead here" in capsys.readouterr().err
    # the command line a parallel run gives a sampling rank's process
    args = ["sample", "--info", str(tmp_path / "prepared.json"), "--rank", "1", "--world", "2"]
    assert warmup.main(args) == 0 and "nothing is compiled ahead here" in capsys.readouterr().err
    # what it would build on a GPU: the arms' U-Net for prepare's images
    config = warmup.unet_config(_params(), json.loads((tmp_path / "prepared.json").read_text()))
    assert (config.image_size, config.in_channels, config.num_classes) == (8, 1, 10)


def test_compile_summary_names_the_longest_compile_counters_in_order(monkeypatch):
    """What the warm-up prints of a compile: the `top` longest of Dynamo's counters, longest first, with their
    seconds; after a real compilation the outermost counter (which holds every other) is among them."""
    from torch._dynamo import utils

    names, values = ["a", "b", "c", "d"], ["0.5", "3.25", "0.0", "1.0"]
    monkeypatch.setattr(utils, "compile_times", lambda repr, aggregate: (names, values))
    lines = warmup.compile_summary(top=3).splitlines()
    assert [line.split() for line in lines] == [["b", "3.2"], ["d", "1.0"], ["a", "0.5"]]
    monkeypatch.undo()

    torch._dynamo.reset()
    fn = torch.compile(lambda x: (x.sin() + 1).relu().sum(), backend="aot_eager")
    fn(torch.randn(8))
    lines = warmup.compile_summary(top=5).splitlines()
    assert 1 <= len(lines) <= 5
    assert "_compile.compile_inner" in [line.split()[0] for line in lines]


@pytest.mark.parametrize(
    "broken",
    [
        lambda repr, aggregate: (_ for _ in ()).throw(RuntimeError("gone")),  # raises
        lambda repr, aggregate: (["a", "b"], ["1.0"]),  # names and values of different lengths
        lambda repr, aggregate: (["a"], ["1.0, 2.0"]),  # values not aggregated
    ],
)
def test_compile_summary_reports_a_failing_counter_api_instead_of_raising(monkeypatch, broken):
    """The counters are a private torch API read inside the training step's callback: whatever it does, the
    warm-up gets a line saying so, not an exception that would end it before the FID curve's compilation."""
    from torch._dynamo import utils

    monkeypatch.setattr(utils, "compile_times", broken)
    out = warmup.compile_summary()
    assert out.startswith("  (torch._dynamo.utils.compile_times failed:")
