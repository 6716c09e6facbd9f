"""One trial: train with the trial's parameters, score, report to Optuna and to MLflow.

The trial calls what the stages call — `cfg.engine.training.train_diffusion` and `cfg.engine.scoring.score_model`
(`generate_w_grid`, then `cfg.eval.cells.score`) — so its numbers are the pipeline's. fid trials report
intermediate FIDs of search.n_samples_cheap samples for the pruner; fid_is trials get the full sample count only
when their cheap pass is not dominated (search.promote).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import Trial, TrialState

from cfg.data.datasets import ImageDataset
from cfg.engine.generate import sampling_kwargs
from cfg.engine.scoring import score_model
from cfg.engine.training import train_diffusion, train_kwargs
from cfg.eval.features import FeatureExtractor
from cfg.eval.stats import ReferenceStats
from cfg.nets.unet import UNetConfig
from cfg.progress import Progress
from cfg.search.space import SearchError, SearchSpec, trial_params
from cfg.search.storage import experimental_ok, retry_of
from cfg.study.config import Params
from cfg.study.store import flatten
from cfg.study.tracking import Tracker

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Inputs and scores of a trial


@dataclass
class SearchInputs:
    """What every trial reads: the prepared data, the evaluation network and the reference statistics."""

    data: ImageDataset
    extractor: FeatureExtractor
    reference: ReferenceStats
    device: torch.device

    def fingerprint(self) -> str:
        """Identity of the inputs: every worker of a study must score against the same ones."""
        return f"data {self.data.fingerprint()[:16]} reference {self.reference.hash}"

    def check(self, extractor_file: str | None, reference_file: str) -> None:
        """The evaluation network is the one the reference statistics were computed with (else every FID of
        the study would be refused or meaningless); raises SearchError naming both files and their weights.
        `extractor_file`: where the network's weights came from (None: torch-fidelity's Inception download)."""
        ext, ref = self.extractor, self.reference
        # a reference that does not record its weights ("") is scored as it is, as cfg.eval.fingerprint does
        if not ref.weights_hash or ext.weights_hash == ref.weights_hash:
            return
        source = extractor_file or "torch-fidelity's Inception weights"
        raise SearchError(
            f"the evaluation network {source} ({ext.name}, weights {ext.weights_hash}) is not the one the "
            f"reference statistics {reference_file} were computed with ({ref.extractor_name}, weights "
            f"{ref.weights_hash}): give the matching files (dvc repro classifier reference, or dvc pull)"
        )


def score_w_grid(
    model: torch.nn.Module,
    p: Params,
    w_values: list[float],  # guidance strengths, the paper's w
    n_samples: int,  # images per w
    inputs: SearchInputs,
) -> list[tuple[float, float]]:
    """(FID, IS) per w by `score_model`, as the train stage's FID-during-training curve is scored."""
    scores = score_model(
        model,
        w_values,
        n_samples,
        extractor=inputs.extractor,
        reference=inputs.reference,
        sampling=sampling_kwargs(p),
        batch_size=p.evaluate.batch_size,
        device=inputs.device,
    )
    return [(s["fid"], s["is"]) for s in scores]


def _dominated(point: tuple[float, float], others: list[tuple[float, float, int]]) -> int | None:
    """The number of a trial whose (FID, IS) is at least as good in both and better in one, else None."""
    f, i = point
    for of, oi, number in others:
        if of <= f and oi >= i and (of < f or oi > i):
            return number
    return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def requeue_interrupted(trial: Trial) -> None:
    """Queue a trial stopped by Ctrl-C (SIGINT) to run again, with its values, as a retry of it: what
    RetryHeartbeatStaleTrialCallback does for a lost worker's trial (the `failed_trial` system attribute), so
    the retry is not counted against search.n_trials. Always: an interrupt says nothing against the trial, so
    search.max_retry (crashes) does not stop it. SIGTERM and SIGHUP leave the trial RUNNING instead, for the
    heartbeat to fail and retry it."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with experimental_ok():
        RetryHeartbeatStaleTrialCallback(max_retry=None)(trial.study, frozen)


# ---------------------------------------------------------------------------------------------------------
# The objective


class Objective:
    """One trial: train with the trial's parameters, score, report to Optuna and to MLflow."""

    def __init__(self, spec: SearchSpec, inputs: SearchInputs, lock, tracker: Tracker, log: Log):
        self.spec, self.inputs, self.lock, self.log = spec, inputs, lock, log
        self.tracker = tracker

    def __call__(self, trial: Trial) -> float | tuple[float, float]:
        self.lock.release()  # the trial exists and counts: other workers may start theirs
        try:
            return self._run(trial)
        except KeyboardInterrupt:  # Optuna fails the trial on the way out: it is queued again first
            requeue_interrupted(trial)
            self.log(f"trial {trial.number} interrupted: queued to run again (not counted against n_trials)")
            raise

    def _run(self, trial: Trial) -> float | tuple[float, float]:
        overrides = self.spec.suggest(trial)
        p = trial_params(self.spec, overrides)
        w_values = p.sample.w if "sample.w" in overrides else p.search.w
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("w_grid", w_values)
        trial.set_user_attr("worker", worker_id())
        run_id = self._start_run(trial, overrides, w_values)
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            values = self._train_and_score(trial, p, w_values, run_id)
        except optuna.TrialPruned as e:
            self._end_run(run_id, "PRUNED", "KILLED")
            self.log(f"trial {trial.number} pruned: {e}")
            raise
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                self.tracker.log(run_id, tags={"failure": "interrupted (SIGINT): queued to run again"})
            self._end_run(run_id, "FAIL", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self._end_run(run_id, "COMPLETE", "FINISHED")
        return values

    def _start_run(self, trial: Trial, overrides: dict, w_values: list[float]) -> str:
        s = self.spec.search
        study_run = trial.study.user_attrs["mlflow_run_id"]
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retried = retry_of(frozen)
        tags = {
            "run_kind": "trial",
            "mlflow.parentRunId": study_run,
            "optuna.study_name": s.study_name,
            "optuna.trial_number": trial.number,
            "worker": worker_id(),
            **({"optuna.retry_of": retried} if retried is not None else {}),
        }
        run_id = self.tracker.start_run(f"trial {trial.number}", self.spec.settings_hash(), tags)
        self.tracker.log(
            run_id,
            params={
                **flatten(overrides),
                "w_grid": w_values,
                "n_samples": self.spec.params.sample.n_samples,
                "n_samples_cheap": s.n_samples_cheap,
            },
        )
        return run_id

    def _end_run(self, run_id: str, state: str, status: str) -> None:
        self.tracker.log(run_id, tags={"optuna.state": state})
        self.tracker.end(run_id, status)

    def _train_and_score(
        self, trial: Trial, p: Params, w_values: list[float], run_id: str
    ) -> float | tuple[float, float]:
        s, t, inputs = p.search, p.train, self.inputs
        t0 = time.perf_counter()
        progress = Progress(f"search trial {trial.number}", t.steps, "steps", every_s=30)

        def at_log(entry: dict) -> None:
            step = entry["step"]
            progress.update(step, f"loss {entry['loss']:.4g}")
            self.tracker.log(run_id, metrics={"loss": entry["loss"]}, step=step)
            if self.spec.multi or step % s.eval_every or step == t.steps:
                return
            # Intermediate FID of a few samples at a checkpoint: what the pruner judges
            cheap = min(f for f, _ in score_w_grid(entry["ema"], p, w_values, s.n_samples_cheap, inputs))
            trial.report(cheap, step)
            self.tracker.log(run_id, metrics={"fid_cheap": cheap}, step=step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"FID {cheap:.4g} of {s.n_samples_cheap} samples per w at step {step}"
                )

        result = train_diffusion(
            UNetConfig.from_params(
                p.model,
                image_size=inputs.data.image_size,
                in_channels=inputs.data.channels,
                num_classes=inputs.data.num_classes,
            ),
            inputs.data.train_x,
            inputs.data.train_y,
            p_uncond=t.p_uncond[0],
            device=inputs.device,
            **train_kwargs(t),
            log_every=math.gcd(t.log_every, s.eval_every),  # only how often the callback runs
            callback=at_log,
        )
        self.tracker.log(
            run_id,
            metrics={"final_loss": result.history[-1]["loss"], "train_images_per_s": result.images_per_s},
        )
        if self.spec.multi:
            self._promote(trial, p, w_values, result.ema, run_id)
        scores = score_w_grid(result.ema, p, w_values, p.sample.n_samples, inputs)
        best = min(range(len(w_values)), key=lambda j: scores[j][0])
        fid_best, is_best = scores[best]
        trial.set_user_attr("w", w_values[best])
        self.tracker.log(
            run_id,
            metrics={
                "fid": fid_best,
                "is": is_best,
                "w": w_values[best],
                "seconds": time.perf_counter() - t0,
                **{f"fid_w{w:g}": f for w, (f, _) in zip(w_values, scores, strict=True)},
                **{f"is_w{w:g}": i for w, (_, i) in zip(w_values, scores, strict=True)},
            },
        )
        self.log(
            f"trial {trial.number}: FID {fid_best:.4g}, IS {is_best:.4g} at w={w_values[best]:g} "
            f"({time.perf_counter() - t0:.0f}s) {trial.user_attrs['overrides']}"
        )
        return (fid_best, is_best) if self.spec.multi else fid_best

    def _promote(self, trial: Trial, p: Params, w_values: list[float], model, run_id: str) -> None:
        """fid_is: a cheap pass first; the full count only for trials search.promote lets through."""
        s = p.search
        ((f, i),) = score_w_grid(model, p, w_values, s.n_samples_cheap, self.inputs)
        trial.set_user_attr("cheap", [f, i])
        self.tracker.log(run_id, metrics={"fid_cheap": f, "is_cheap": i})
        if s.promote == "all":
            return
        done = [
            (*t.user_attrs["cheap"], t.number)
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "cheap" in t.user_attrs
        ]
        better = _dominated((f, i), done)
        if better is not None:
            raise optuna.TrialPruned(
                f"cheap pass (FID {f:.4g}, IS {i:.4g} of {s.n_samples_cheap} samples) dominated by trial {better}'s"
            )
