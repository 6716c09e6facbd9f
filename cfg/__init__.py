"""cfg-lab: classifier-free diffusion guidance (Ho & Salimans 2022), as a tested library.

Packages (none does I/O at import; docs/architecture.md has the layers and the data path):
    maths     diffusion (log-SNR schedule, loss, label dropout), guidance (GUIDANCE), samplers (SAMPLERS)
    nets      the U-Net with EMA and checkpoints, the evaluation classifier, the FID Inception-v3
    data      data sets (DATASETS) as tensors in [-1, 1]; uint8 <-> float and sample grids
    eval      features (EXTRACTORS) -> statistics -> metrics (METRICS); fingerprints; cells: evaluate_samples
    engine    device, the training loop (EMA warm-up, resume state), generation of a whole w grid
    study     config (the params schema), records (SampleSet, CellRecord), stage helpers, tracking (MLflow,
              the only importer of mlflow), presets, report, plots
    search    Optuna search (the only package importing optuna)
    registry  the generic Registry: name -> function, options = its keyword-only arguments with defaults
    io        atomic writes
"""

__version__ = "0.1.0"
