"""Compiling ahead (cfg.engine.warmup): the networks the warm-up runs are those the stages run, call for call, so
that torch.compile's caches it fills are the ones the stages look up; and `cfg-lab repro --parallel` plans it only
where something will compile.

torch.compile runs on CUDA only, so on this CPU the tests compare what Inductor keys a compiled graph on, as far
as the CPU shows it: the network's configuration, train/eval mode, whether its weights take gradients, whether
autograd records, and each input's shape, dtype and memory layout. Whether the GPU then hits the cache is
measured on a GPU (README "Several GPUs")."""

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
    """Every U-Net forward while open: what a compiled graph is keyed on, as far as the CPU shows it."""

    def __enter__(self):
        self.seen: set[tuple] = set()

        def hook(module, args):
            if isinstance(module, UNet):
                weight = next(module.parameters())
                self.seen.add(
                    (
                        json.dumps(module.config.to_dict(), sort_keys=True),
                        module.training,
                        weight.requires_grad,
                        torch.is_grad_enabled(),
                        tuple(
                            (tuple(a.shape), a.dtype, a.is_contiguous(memory_format=torch.channels_last))
                            for a in args
                        ),
                    )
                )

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _info(ds) -> dict:
    return {"image_size": ds.image_size, "channels": ds.channels, "classes": ds.classes}


def _stage_calls(params, ds, tmp_path: Path) -> set[tuple]:
    """The U-Net calls of the train stage (its step and its FID curve) and of the sample stage, through the
    functions the stages call, on the digits."""
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

    with Calls() as calls:
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
        sample_checkpoint(model, meta, params, checkpoint="checkpoint.pt", device="cpu")
    return calls.seen


def _warm_calls(params, ds) -> set[tuple]:
    config = warmup.unet_config(params, _info(ds))
    with Calls() as calls:
        warmup.warm_train(params, config, torch.device("cpu"))
        warmup.warm_sample(params, config, torch.device("cpu"))
    return calls.seen


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8, max_train=300, max_test=100)


def test_the_warm_up_runs_the_networks_the_train_and_sample_stages_run(digits, tmp_path):
    # n_samples 50 is not a multiple of the 40 examples a batch of 120 rows holds at 3 w: a short last batch
    # (another shape) in the sample stage, which the warm-up must run too
    params = _params(sample={"w": [-1.0, 0.0, 1.0], "steps": 3, "n_samples": 50, "batch_size": 120})
    stage = _stage_calls(params, digits, tmp_path)
    warm = _warm_calls(params, digits)
    kinds = {(training, grad) for _, training, _, grad, _ in stage}
    assert kinds == {(True, True), (False, False)}, "a training step and sampling: both kinds were seen"
    assert len({shapes for *_, shapes in stage}) >= 4, "train, FID curve, a full and a short sample batch"
    assert stage <= warm, f"calls of the stages the warm-up does not make: {stage - warm}"


def test_the_comparison_can_fail_on_another_batch_shape(digits, tmp_path):
    params = _params(sample={"w": [-1.0, 0.0, 1.0], "steps": 3, "n_samples": 40, "batch_size": 120})
    stage = _stage_calls(params, digits, tmp_path)
    other = _params(sample={"w": [-1.0, 0.0, 1.0], "steps": 3, "n_samples": 40, "batch_size": 60})
    missing = stage - _warm_calls(other, digits)
    assert missing and all(not training for _, training, *_ in missing), (
        "only the sample stage's calls differ"
    )


def test_what_is_compiled_ahead_where():
    params = _params(train={"compile": True, "devices": 1}, sample={"compile": True})
    assert warmup.warm_parts(params, "cpu") == [], "nothing compiles on CPU"
    assert warmup.warm_parts(params, "cuda") == ["train", "sample"]
    assert warmup.warm_parts(_params(train={"compile": True, "devices": "all"}), "cuda")[0] == "train"
    assert "train" not in warmup.warm_parts(_params(train={"compile": True, "devices": 2}), "cuda"), "DDP"
    assert warmup.warm_parts(_params(train={"compile": False}, sample={"compile": False}), "cuda") == []


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
    assert warm_plan(["sample"], p, {"train@0.1"}) == ["sample"], "the train arms' FID curve samples"


def test_the_module_reads_the_data_shape_from_prepares_summary(tmp_path, digits, capsys):
    (tmp_path / "prepared.json").write_text(json.dumps(_info(digits)))
    assert warmup.main(["train", "--info", str(tmp_path / "prepared.json")]) == 0
    assert "nothing is compiled ahead here" in capsys.readouterr().err, "CPU: a no-op that says so"
