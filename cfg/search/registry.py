"""Optuna samplers and pruners by the names search.sampler and search.pruner take: one factory function each.

The params schema (cfg.study.config) reads its allowed names from here, so this module imports no optuna at
import: each factory imports it when called. A factory takes the section's options dict (search.sampler_options,
search.pruner_options: keyword arguments of the Optuna class) and, for samplers, the seed. Adding one = one
function and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler


# ---------------------------------------------------------------------------------------------------------
# Samplers: (options, seed) -> sampler


def tpe_sampler(options: dict, seed: int | None) -> BaseSampler:
    """Tree-structured Parzen estimator, one or several objectives."""
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, **options)


def random_sampler(options: dict, seed: int | None) -> BaseSampler:
    """Independent uniform draws: the baseline."""
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=seed, **options)


def nsgaii_sampler(options: dict, seed: int | None) -> BaseSampler:
    """NSGA-II genetic algorithm, for the fid_is Pareto front."""
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler(seed=seed, **options)


def gp_sampler(options: dict, seed: int | None) -> BaseSampler:
    """Gaussian-process Bayesian optimisation, for few expensive trials."""
    from optuna.samplers import GPSampler

    return GPSampler(seed=seed, **options)


SAMPLERS: dict[str, Callable[[dict, int | None], BaseSampler]] = {
    "tpe": tpe_sampler,
    "random": random_sampler,
    "nsgaii": nsgaii_sampler,
    "gp": gp_sampler,
}


# ---------------------------------------------------------------------------------------------------------
# Pruners of fid trials on their intermediate FIDs: options -> pruner


def median_pruner(options: dict) -> BasePruner:
    """Stop a trial whose intermediate FID is worse than the median of earlier trials at the same step."""
    from optuna.pruners import MedianPruner

    return MedianPruner(**options)


def percentile_pruner(options: dict) -> BasePruner:
    """Stop a trial outside the given percentile of earlier trials at the same step (needs `percentile`)."""
    from optuna.pruners import PercentilePruner

    return PercentilePruner(**options)


def hyperband_pruner(options: dict) -> BasePruner:
    """Hyperband: successive halving over several budgets."""
    from optuna.pruners import HyperbandPruner

    return HyperbandPruner(**options)


def successive_halving_pruner(options: dict) -> BasePruner:
    """Asynchronous successive halving."""
    from optuna.pruners import SuccessiveHalvingPruner

    return SuccessiveHalvingPruner(**options)


def none_pruner(options: dict) -> BasePruner:
    """Never prune."""
    from optuna.pruners import NopPruner

    return NopPruner(**options)


PRUNERS: dict[str, Callable[[dict], BasePruner]] = {
    "median": median_pruner,
    "percentile": percentile_pruner,
    "hyperband": hyperband_pruner,
    "successive_halving": successive_halving_pruner,
    "none": none_pruner,
}
