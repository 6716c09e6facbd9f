"""cfg-lab: classifier-free diffusion guidance (Ho & Salimans 2022), as a tested library.

Modules (none does I/O at import):
    diffusion   log-SNR schedule, forward process, training loss, label dropout
    guidance    guided epsilon with the conditional and unconditional passes in one batch
    samplers    pure sampling functions (ancestral, DDIM) and their registry
    model       ADM-style U-Net configured by a dataclass, EMA of weights
    data        labelled image data sets as tensors in [-1, 1]
    classifier  the evaluation network (default feature extractor for FID / IS)
    metrics     FID, IS, KID, precision / recall, class accuracy, fingerprints
    training    the diffusion training loop
    config      the typed schema of params.yaml
    tracking    MLflow helpers (the only module that imports mlflow)
    search      Optuna helpers (the only module that imports optuna)
"""

__version__ = "0.1.0"
