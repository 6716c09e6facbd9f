"""Optuna searches a guidance method's options: `sample.guidance.<label>.<option>` keys in search.space, checked
against the method's registry entry, applied to the trial's params, and a real study that scores the method."""

from __future__ import annotations

import optuna
import pytest
import yaml

from cfg.engine.generate import sampling_kwargs
from cfg.search.results import best_params_yaml, best_trials
from cfg.search.space import SearchError, check_search, trial_params
from cfg.search.worker import run_worker

from .test_search import input_files, inputs, mlflow_store, tiny_raw  # noqa: F401  (fixtures)

SPACE = {
    "sample.guidance.interval.lambda_lo": {"low": -6.0, "high": -1.0},
    "sample.guidance.interval.lambda_hi": {"low": 0.0, "high": 6.0},
}


def _raw(tmp_path, guidance=None, **search):
    raw = tiny_raw(tmp_path, **search)
    raw["train"]["p_uncond"] = [0.2]
    raw["sample"]["guidance"] = guidance or {"interval": {}}
    return raw


def test_guidance_options_are_search_dimensions_applied_to_the_trial(tmp_path):
    spec = check_search(_raw(tmp_path, space=SPACE))
    assert [(d.key, d.kind, d.low, d.high) for d in spec.space] == [
        ("sample.guidance.interval.lambda_lo", "float", -6.0, -1.0),
        ("sample.guidance.interval.lambda_hi", "float", 0.0, 6.0),
    ]
    p = trial_params(
        spec, {"sample.guidance.interval.lambda_lo": -2.5, "sample.guidance.interval.lambda_hi": 1.5}
    )
    assert p.sample.guidance == {"interval": {"lambda_lo": -2.5, "lambda_hi": 1.5}}
    kw = sampling_kwargs(p)  # what the trial samples with
    assert (kw["guidance"], kw["guidance_options"]) == ("interval", {"lambda_lo": -2.5, "lambda_hi": 1.5})
    # an entry under another label: its method's options, typed by their defaults
    spec = check_search(
        _raw(
            tmp_path,
            {"apg_b": {"method": "apg", "eta": 0.5}},
            space={"sample.guidance.apg_b.eta": {"choices": [0.0, 1.0]}},
        )
    )
    assert trial_params(spec, {"sample.guidance.apg_b.eta": 1.0}).sample.guidance == {
        "apg_b": {"method": "apg", "eta": 1.0}
    }


@pytest.mark.parametrize(
    "guidance, space, message",
    [
        (
            None,
            {"sample.guidance.cfg.phi": {"low": 0.0, "high": 1.0}},
            r"<label> an entry of sample\.guidance \(\['interval'\]\)",
        ),
        (
            None,
            {"sample.guidance.interval.phi": {"low": 0.0, "high": 1.0}},
            r"'phi' is not an option of guidance method 'interval'",
        ),
        (
            {"rescale": {}},
            {"sample.guidance.rescale.phi": {"low": 0.0, "high": 1.5}},
            r"phi = 1\.5 is out of range",
        ),
        (
            {"schedule": {}},
            {"sample.guidance.schedule.shape": {"low": 0, "high": 1}},
            r"is a str; search it with \{choices",
        ),
        (
            {"schedule": {}},
            {"sample.guidance.schedule.shape": {"choices": ["linear", "square"]}},
            r"shape = 'square' is not allowed",
        ),
        (
            {"cfg": {}, "interval": {}},
            {"train.lr": {"low": 1e-4, "high": 1e-2}},
            r"a trial scores one guidance method",
        ),
        ({"autoguidance": {}}, {"train.lr": {"low": 1e-4, "high": 1e-2}}, r"without a guide network"),
    ],
)
def test_bad_guidance_dimensions_are_refused_naming_key_and_value(tmp_path, guidance, space, message):
    with pytest.raises((SearchError, ValueError), match=message):
        check_search(_raw(tmp_path, guidance, space=space))


@pytest.mark.slow
def test_a_study_searches_the_guidance_interval(tmp_path, inputs):  # noqa: F811
    """Two real trials that train one model each and score the interval method with their own λ range."""
    space = {"train.steps": {"low": 20, "high": 30, "step": 10}, **SPACE}
    spec = check_search(_raw(tmp_path, space=space, n_trials=2, w=[1.0]))
    queued = optuna.create_study(study_name="cfg-search", storage=spec.search.storage)
    for lo, hi in ((-5.0, 5.0), (-1.5, 0.5)):
        queued.enqueue_trial(
            {
                "train.steps": 20,
                "sample.guidance.interval.lambda_lo": lo,
                "sample.guidance.interval.lambda_hi": hi,
            }
        )
    study = run_worker(spec, inputs, log=lambda _: None)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # the same model (same steps and seed) and noise, different intervals: different samples, different FIDs
    assert trials[0].value != trials[1].value
    (best,) = best_trials(study)
    overrides = yaml.safe_load(best_params_yaml(study, best))
    assert overrides["sample.guidance.interval.lambda_lo"] == pytest.approx(
        best.params["sample.guidance.interval.lambda_lo"]
    )
    assert trial_params(spec, overrides).sample.guidance["interval"]["lambda_hi"] == pytest.approx(
        best.params["sample.guidance.interval.lambda_hi"]
    )
