"""Results of a study: the best trial or the Pareto front, and the params.yaml overrides reproducing each."""

from __future__ import annotations

from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from cfg.search.space import GUIDANCE_KEY
from cfg.search.storage import STUDY_OVERRIDES, retry_of


def trial_overrides(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The params.yaml overrides that reproduce a trial: the study's -S overrides (`study_overrides`), under the
    trial's own values, sample.w being the w values it was scored at.

    The whole grid, not only its best w: the sample stage then draws the very batches and noise the trial drew
    (generate_w_grid batches by the number of w), so the pipeline's cell at the best w has the trial's FID.
    The guidance entry a trial scored (`trial_guidance`) is no override: the pipeline samples every entry of
    sample.guidance, each with the same noise, so that entry's cells are the trial's and the others' compare.
    """
    overrides = {k: v for k, v in trial.user_attrs["overrides"].items() if k != GUIDANCE_KEY}
    return {**study_overrides(study), **overrides, "sample.w": trial.user_attrs["w_grid"]}


def study_overrides(study: optuna.Study) -> dict[str, Any]:
    """The -S overrides of params.yaml the study's trials ran with (`SearchSpec.pipeline_overrides`, recorded
    by its workers as they join)."""
    return dict(study.user_attrs.get(STUDY_OVERRIDES) or {})


def trial_guidance(trial: FrozenTrial) -> str | None:
    """The sample.guidance label a trial scored, where it picked one of several entries."""
    return trial.user_attrs["overrides"].get(GUIDANCE_KEY)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (fid) or the Pareto front sorted by FID (fid_is); empty before any trial completes."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def summary(study: optuna.Study) -> dict:
    """Trial counts by state and the best trial or the Pareto front, each with the overrides reproducing it."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    names = ["fid"] if len(study.directions) == 1 else ["fid", "is"]
    best = [
        {
            "number": t.number,
            **dict(zip(names, t.values, strict=True)),
            "w": t.user_attrs["w"],
            **({"guidance": trial_guidance(t)} if trial_guidance(t) else {}),
            "overrides": trial_overrides(study, t),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
        }
        for t in best_trials(study)
    ]
    return {
        "study_name": study.study_name,
        "objective": "fid" if len(names) == 1 else "fid_is",
        "trials": len(trials),
        "states": counts,
        "retried": sum(retry_of(t) is not None for t in trials),
        "best" if len(names) == 1 else "pareto_front": best,
        "mlflow_run_id": study.user_attrs.get("mlflow_run_id"),
    }


def best_params_yaml(study: optuna.Study, trial: FrozenTrial) -> str:
    """A params file of dotted overrides reproducing `trial` through the pipeline (cfg.study.presets applies it)."""
    values = ", ".join(f"{n} {v:.4g}" for n, v in zip(("FID", "IS"), trial.values, strict=False))
    label = trial_guidance(trial)
    ran_with = [k for k in study_overrides(study) if k not in trial.user_attrs["overrides"]]
    header = (
        f"# Trial {trial.number} of Optuna study {study.study_name!r}: {values} at w = {trial.user_attrs['w']:g}"
        + (f" with guidance entry {label!r}" if label else "")
        + ".\n"
        "# Reproduce it through the pipeline:  python pipelines/search.py apply <this file> --run\n"
        "#                             (runs:  dvc exp run -S key=value ...)\n"
        + (
            f"# The run samples every entry of sample.guidance with the same noise: {label!r}'s cells are this trial's.\n"
            if label
            else ""
        )
        + (
            f"# With the search's own -S overrides of params.yaml: {', '.join(ran_with)}.\n"
            if ran_with
            else ""
        )
    )
    return header + yaml.safe_dump(trial_overrides(study, trial), sort_keys=False, default_flow_style=None)
