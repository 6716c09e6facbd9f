"""Score a model in memory: sample a few w as the sample stage does, score them as the evaluate stage does.

The FID-during-training curve of the train stage and the search's intermediate and final FIDs both come from
`score_model`, so they measure what the pipeline measures (with fewer samples, so with more FID bias).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from cfg.engine.generate import NonFiniteSamples, generate_w_grid
from cfg.eval.cells import score
from cfg.eval.features import FeatureExtractor, extract_features
from cfg.eval.stats import ReferenceStats


def score_model(
    model: torch.nn.Module,  # ε_θ(z, λ, c) with a UNetConfig `config`, e.g. the EMA weights mid-training
    w_values: Sequence[float],  # guidance strengths, the paper's w
    n_samples: int,  # images per w
    *,
    extractor: FeatureExtractor,  # the evaluate stage's (evaluate.extractor)
    reference: ReferenceStats,  # its reference statistics (data/reference.pt)
    sampling: dict,  # generate_w_grid's settings: cfg.engine.generate.sampling_kwargs(params)
    metrics: dict[str, dict] | None = None,  # METRICS entry -> resolved options; default fid and is
    batch_size: int = 500,  # images per extractor batch
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Each w's metric columns (`cfg.eval.cells.score`), in the order of `w_values`.

    The global RNG streams are left as they were, so a training run that scores its EMA weights continues
    exactly as one that does not (sampling draws from its own seeded generators).
    """
    cfg = model.config
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        images, labels = generate_w_grid(
            model,
            w_values,
            n_samples,
            num_classes=cfg.num_classes,
            image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
            device=device,
            **sampling,
        )  # (W, N, C, H, W) uint8
        out = []
        for j in range(len(w_values)):
            gen = extract_features(extractor, images[j], batch_size=batch_size, device=device)
            out.append(
                score(
                    gen,
                    labels,
                    reference,
                    metrics or {"fid": {}, "is": {}},
                    class_logits=gen.logits,
                    seed=sampling.get("seed", 0),
                    device=device,
                )
            )
    return out


def w_column(metric: str, w: float) -> str:
    """The column of one metric at one w: `fid_w0`, `is_w0.3` (MLflow metrics, CSV)."""
    return f"{metric}_w{w:g}"


def by_w(
    w_values: Sequence[float], scores: list[dict[str, float]], names: Sequence[str] = ("fid", "is")
) -> dict[str, float]:
    """`score_model`'s result as flat columns, `w_column(name, w)` for each w and name."""
    return {w_column(m, w): s[m] for w, s in zip(w_values, scores, strict=True) for m in names}


def training_curve(
    params,  # cfg.study.config.Params: train.eval_w / eval_samples, the sample and evaluate sections
    classifier_path: str,  # models/classifier.pt
    reference_path: str,  # data/reference.pt
    device: torch.device | str,
    w_eval: Sequence[float] | None = None,  # the w scored; default 0 and train.eval_w
) -> tuple[list[str], Callable[[torch.nn.Module], dict[str, float]]]:
    """The train stage's convergence curve: (its columns, a function of the EMA weights -> FID and IS at
    w = 0 and train.eval_w, or `w_eval`, as `w_column`s), scored as the evaluate stage scores (fewer samples)."""
    from cfg.engine.generate import sampling_kwargs
    from cfg.eval.features import extractor_by_name
    from cfg.eval.stats import load_reference_stats
    from cfg.study.stage import data_root

    t, e = params.train, params.evaluate
    w_eval = [0.0, t.eval_w] if w_eval is None else list(w_eval)
    extractor = extractor_by_name(e.extractor, classifier_path, data_root(e.inception_weights), device)
    reference = load_reference_stats(reference_path)

    def curve(ema: torch.nn.Module) -> dict[str, float]:
        try:
            scores = score_model(
                ema,
                w_eval,
                t.eval_samples,
                extractor=extractor,
                reference=reference,
                sampling=sampling_kwargs(params),
                batch_size=e.batch_size,
                device=device,
            )
        except NonFiniteSamples as diverged:  # a point of a monitoring curve: NaN, and the training goes on
            warnings.warn(f"training curve: {diverged}; its FID and IS are NaN", RuntimeWarning, stacklevel=2)
            return {w_column(name, w): math.nan for w in w_eval for name in ("fid", "is")}
        return by_w(w_eval, scores)

    return [w_column(name, w) for w in w_eval for name in ("fid", "is")], curve
