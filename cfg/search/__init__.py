"""Optuna search over training and sampling settings, at the edge of the library (the only package importing optuna).

A trial applies its values to params.yaml as dotted keys (``train.lr``, ``model.base_width``, ``sample.w``, …),
trains one model with `cfg.engine.training.train_diffusion`, samples with `cfg.engine.generate.generate_w_grid` and scores
with `cfg.eval.metrics` — the calls the train, sample and evaluate stages make — so ``dvc exp run -S key=value``
with the best trial's values reproduces it through the pipeline.

Objectives. ``fid``: the lowest FID, at a searched ``sample.w`` or at the best w of ``search.w``; trials report
intermediate FIDs of ``search.n_samples_cheap`` samples every ``search.eval_every`` training steps and an
Optuna pruner stops the bad ones. ``fid_is``: FID down and IS up, whose answer is the Pareto front; Optuna's
pruners do not apply, so a cheap pass of few samples decides which trials get the full ``sample.n_samples``.

Workers. Any number of processes on any machines share a study through its storage (SQLite by default,
PostgreSQL for several machines). A lock in the storage — a PostgreSQL advisory lock, an flock on the SQLite
file — makes "count the trials, start one" atomic, so together the workers run exactly ``search.n_trials``.
Running trials send heartbeats; the trial of a worker that died is failed after ``search.grace_period`` and run
again (``search.max_retry``), and the workers still alive finish the study.

Modules:
    registry   Optuna samplers and pruners by name (no optuna at import: the params schema reads it)
    space      search.space as dimensions, the validated search (`check_search`), a trial's params
    storage    the storage URL, the workers' lock, heartbeats, the trial budget
    objective  one trial: train, score the w grid, report to Optuna and MLflow
    worker     `run_worker`: join the study, run trials until the budget is spent
    results    the best trial or Pareto front and the overrides reproducing it
"""
