"""Optuna searches a guidance method's options: `sample.guidance.<label>.<option>` keys in search.space, checked
against the method's registry entry, applied to the trial's params, and a real study that scores the method; with
several entries, a trial picks one (`sample.guidance`) and gets only that entry's options."""

from __future__ import annotations

import optuna
import pytest
import yaml

from cfg.engine.generate import sampling_kwargs
from cfg.search.results import best_params_yaml, best_trials, summary, trial_guidance, trial_overrides
from cfg.search.space import GUIDANCE_KEY, SearchError, check_search, trial_params
from cfg.search.worker import run_worker
from cfg.study.config import params_from_dict
from cfg.study.presets import exp_run_command, flat_overrides, merged_params

from .test_search import input_files, inputs, mlflow_store, tiny_raw, write_params  # noqa: F401  (fixtures)

SPACE = {
    "sample.guidance.interval.lambda_lo": {"low": -6.0, "high": -1.0},
    "sample.guidance.interval.lambda_hi": {"low": 0.0, "high": 6.0},
}
# two entries at once: interval's λ range and rescale's φ
TWO = {"interval": {}, "rescale": None}
TWO_SPACE = {**SPACE, "sample.guidance.rescale.phi": {"low": 0.3, "high": 1.0}}


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
        ({"autoguidance": {}}, {"train.lr": {"low": 1e-4, "high": 1e-2}}, r"needs a guide network"),
        (
            {"cfg": {}, "ag": {"method": "autoguidance"}},
            {"train.lr": {"low": 1e-4, "high": 1e-2}},
            r"sample\.guidance\.ag is autoguidance.*search\.space\.sample\.guidance: \{choices: \['cfg'\]\}",
        ),
        (
            TWO,
            {"sample.guidance": {"choices": ["interval", "rescale_07"]}},
            r"search\.space\.sample\.guidance\.choices = .*'rescale_07' is not an entry of sample\.guidance; "
            r"its labels: \['interval', 'rescale'\]",
        ),
        (
            TWO,
            {"sample.guidance": {"low": 0, "high": 1}},
            r"search\.space\.sample\.guidance = .* is searched as \{choices: \[labels\]\}",
        ),
        (
            TWO,
            {"sample.guidance.apg.eta": {"low": 0.0, "high": 1.0}},
            r"search\.space\.sample\.guidance\.apg\.eta: .*<label> an entry of sample\.guidance "
            r"\(\['interval', 'rescale'\]\), got 'sample\.guidance\.apg\.eta'",
        ),
        (
            TWO,
            {"sample.guidance.rescale.lambda_lo": {"low": -3.0, "high": 0.0}},
            r"search\.space\.sample\.guidance\.rescale\.lambda_lo: 'lambda_lo' is not an option of guidance "
            r"method 'rescale'",
        ),
        (
            TWO,
            {"sample.guidance": {"choices": ["rescale"]}, **SPACE},
            r"search\.space\.sample\.guidance\.interval\.lambda_lo: entry 'interval' is not among those a trial "
            r"scores",
        ),
    ],
)
def test_bad_guidance_dimensions_are_refused_naming_key_and_value(tmp_path, guidance, space, message):
    with pytest.raises((SearchError, ValueError), match=message):
        check_search(_raw(tmp_path, guidance, space=space))


def test_two_entries_a_trial_picks_one_and_gets_only_its_options(tmp_path):
    spec = check_search(_raw(tmp_path, TWO, space=TWO_SPACE))
    # the entry a trial scores: a dimension of its own, suggested first
    assert [(d.key, d.choices) for d in spec.space[:1]] == [(GUIDANCE_KEY, ("interval", "rescale"))]
    assert [d.entry for d in spec.space[1:]] == ["interval", "interval", "rescale"]
    # a FixedTrial refuses any parameter it was not given: rescale's trial is never asked for interval's λ
    fixed = optuna.trial.FixedTrial({GUIDANCE_KEY: "rescale", "sample.guidance.rescale.phi": 0.5})
    overrides = spec.suggest(fixed)
    assert overrides == {GUIDANCE_KEY: "rescale", "sample.guidance.rescale.phi": 0.5}
    p = trial_params(spec, overrides)
    assert p.sample.guidance == {"rescale": {"phi": 0.5}}  # the lone entry the trial scores
    kw = sampling_kwargs(p)
    assert (kw["guidance"], kw["guidance_options"]) == ("rescale", {"phi": 0.5})
    fixed = optuna.trial.FixedTrial(
        {
            GUIDANCE_KEY: "interval",
            "sample.guidance.interval.lambda_lo": -2.0,
            "sample.guidance.interval.lambda_hi": 1.0,
        }
    )
    p = trial_params(spec, spec.suggest(fixed))
    assert p.sample.guidance == {"interval": {"lambda_lo": -2.0, "lambda_hi": 1.0}}
    # a subset of the entries, given in the space: only rescale is scored, and an entry without searched options
    spec = check_search(
        _raw(
            tmp_path,
            {"cfg": {}, **TWO},
            space={GUIDANCE_KEY: {"choices": ["cfg", "rescale"]}, "train.lr": {"low": 1e-4, "high": 1e-2}},
        )
    )
    assert [d.key for d in spec.space] == [GUIDANCE_KEY, "train.lr"]
    p = trial_params(spec, spec.suggest(optuna.trial.FixedTrial({GUIDANCE_KEY: "cfg", "train.lr": 1e-3})))
    assert p.sample.guidance == {"cfg": {}} and p.train.lr == 1e-3


def test_the_best_trial_applies_to_an_entry_given_as_null(tmp_path):
    """params.yaml's entries as `null` (the method's defaults): a search over both reports a best trial with
    the interval's own λ range, and best_params.yaml applies to that params.yaml (`pipelines/search.py apply`
    runs exp_run_command; it raised TypeError setting lambda_lo inside the null entry). DVC's `-S` then gives
    the entry the trial's options and keeps the other one."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    raw = _raw(tmp_path, {"cfg": None, "interval": None}, space=SPACE)
    params = write_params(tmp_path, raw)
    spec = check_search(raw)
    scored = {
        GUIDANCE_KEY: "interval",
        "sample.guidance.interval.lambda_lo": -2.0,
        "sample.guidance.interval.lambda_hi": 1.0,
    }
    assert spec.suggest(optuna.trial.FixedTrial(scored)) == scored  # what a trial of this search records
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(value=9.0, user_attrs={"overrides": scored, "w_grid": [0.0], "w": 0.0})
    )
    (best,) = best_trials(study)
    applied = flat_overrides(yaml.safe_load(best_params_yaml(study, best)))
    assert applied == {
        "sample.guidance.interval.lambda_lo": -2.0,
        "sample.guidance.interval.lambda_hi": 1.0,
        "sample.w": [0.0],
    }
    cmd = exp_run_command(applied, params_file=params)
    flags = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-S"]
    assert "+sample.guidance.interval.lambda_lo=-2.0" in flags  # a key the null entry lacks: DVC's `+` form
    dvc_apply_overrides(str(params), flags)  # what `dvc exp run -S ...` does to params.yaml
    after = yaml.safe_load(params.read_text())
    assert after["sample"]["guidance"] == {"cfg": None, "interval": {"lambda_lo": -2.0, "lambda_hi": 1.0}}
    assert params_from_dict(after).sample.guidance == after["sample"]["guidance"]
    assert merged_params(raw, applied)["sample"]["guidance"] == after["sample"]["guidance"]


@pytest.mark.slow
def test_a_study_searches_the_guidance_interval(tmp_path, inputs):  # noqa: F811
    """Two real trials that train one model each and score the interval method with their own λ range. No
    pruner: which trial's intermediate FID is the worse depends on the draws (the median pruner once stopped the
    second trial at step 10 after the noise streams changed), and both trials must finish to compare them."""
    space = {"train.steps": {"low": 20, "high": 30, "step": 10}, **SPACE}
    spec = check_search(_raw(tmp_path, space=space, n_trials=2, w=[1.0], pruner="none", pruner_options={}))
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


@pytest.mark.slow
def test_a_study_searches_two_guidance_entries_at_once(tmp_path, inputs):  # noqa: F811
    """Two real trials on real storage, one per entry: interval with its λ range, rescale with its φ; each trains
    the same model and scores its own method, and the best one's overrides reproduce it."""
    space = {"train.steps": {"low": 20, "high": 30, "step": 10}, **TWO_SPACE}
    # no pruner: both trials are to finish, whichever method trains worse at step 10
    spec = check_search(
        _raw(tmp_path, TWO, space=space, n_trials=2, w=[1.0], pruner="none", pruner_options={})
    )
    queued = optuna.create_study(study_name="cfg-search", storage=spec.search.storage)
    interval = {"sample.guidance.interval.lambda_lo": -1.5, "sample.guidance.interval.lambda_hi": 0.5}
    queued.enqueue_trial({GUIDANCE_KEY: "interval", "train.steps": 20, **interval})
    queued.enqueue_trial({GUIDANCE_KEY: "rescale", "train.steps": 20, "sample.guidance.rescale.phi": 0.5})
    study = run_worker(spec, inputs, log=lambda _: None)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # each trial holds its entry and that entry's options only
    assert trials[0].params == {GUIDANCE_KEY: "interval", "train.steps": 20, **interval}
    assert trials[1].params == {
        GUIDANCE_KEY: "rescale",
        "train.steps": 20,
        "sample.guidance.rescale.phi": 0.5,
    }
    assert [trial_guidance(t) for t in trials] == ["interval", "rescale"]
    assert trials[0].value != trials[1].value  # the same model and noise, another method
    (best,) = best_trials(study)
    assert summary(study)["best"][0]["guidance"] == trial_guidance(best)
    # best_params.yaml: the entry's options (applied to params.yaml's entry; the run samples both entries)
    text = best_params_yaml(study, best)
    assert f"with guidance entry '{trial_guidance(best)}'" in text
    overrides = yaml.safe_load(text)
    assert GUIDANCE_KEY not in overrides and overrides == trial_overrides(study, best)
    again = trial_params(spec, best.user_attrs["overrides"])
    assert list(again.sample.guidance) == [trial_guidance(best)]
