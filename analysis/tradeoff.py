"""The FID / IS trade-off of a CFG study: the notebook's one import point (`from analysis import tradeoff as T`).

Each concept lives in its own module; this one re-exports their public names:
- `analysis.columns`: the tidy run table's columns, read off `cfg.study.records.CellRecord`;
- `analysis.loaders`: every evaluated cell from the MLflow store and the DVC experiments in one frame;
- `analysis.selection`: which rows make one study, one guidance method's curves of it (`method_rows`), and the
  refusal to compare mixed metric fingerprints;
- `analysis.frontiers`: FID-vs-IS Pareto fronts, their ranking and the curves' shape;
- `cfg.study.frontier`: the guidance methods of a study compared on one protocol (`compare_methods` of the
  cell records, `dominance_sentences`), as the report shows them;
- `analysis.paper`: the paper's Table 1 and our shape beside it;
- `analysis.narrative`: the findings in words.
"""

from analysis.columns import (
    CELL_PARAMS,
    FINGERPRINT_FIELDS,
    KEY,
    LEADING,
    TAGS,
    order_columns,
    tidy_options,
    type_cells,
)
from analysis.frontiers import curve_shapes, frontier_fid, frontiers, hypervolume, pareto_mask, rank_frontiers
from analysis.loaders import (
    cell_records,
    dvc_exp_show,
    dvc_revisions,
    dvc_tables,
    load_runs,
    merge_sources,
    mlflow_frame,
    sample_grid_image,
    tidy_dvc,
    tidy_mlflow,
)
from analysis.narrative import narrative
from analysis.paper import compare_to_paper, paper_table1
from analysis.selection import (
    PAPER_METHOD,
    fingerprint_groups,
    guidance_methods,
    method_rows,
    require_comparable,
    select,
)
from cfg.study.frontier import compare_methods, dominance_sentences, front_dominates
from cfg.study.ui import default_experiment  # tracking.experiment of a project's params.yaml

__all__ = [
    "CELL_PARAMS",
    "FINGERPRINT_FIELDS",
    "KEY",
    "LEADING",
    "PAPER_METHOD",
    "TAGS",
    "cell_records",
    "compare_methods",
    "compare_to_paper",
    "curve_shapes",
    "default_experiment",
    "dvc_exp_show",
    "dvc_revisions",
    "dominance_sentences",
    "dvc_tables",
    "fingerprint_groups",
    "front_dominates",
    "frontier_fid",
    "frontiers",
    "guidance_methods",
    "hypervolume",
    "load_runs",
    "merge_sources",
    "method_rows",
    "mlflow_frame",
    "narrative",
    "order_columns",
    "paper_table1",
    "pareto_mask",
    "rank_frontiers",
    "require_comparable",
    "sample_grid_image",
    "select",
    "tidy_dvc",
    "tidy_mlflow",
    "tidy_options",
    "type_cells",
]
