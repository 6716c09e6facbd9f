"""Analysis of CFG studies in notebooks: load runs from MLflow and DVC, frontiers, paper comparison."""
