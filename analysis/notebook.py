"""Run analysis/tradeoff.ipynb headless against a store, with its parameters set.

`python -m analysis.notebook [--uri URI] [--project DIR] [--experiment E] [--select S] [--method M]
[--figures DIR] [--out PATH]` (or `cfg-lab notebook ...`) executes the notebook in a kernel of this Python and
writes the executed copy, outputs and all, to results/notebook/tradeoff.ipynb (OUT): the tracked
analysis/tradeoff.ipynb stays without outputs.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

NOTEBOOK = Path(__file__).resolve().with_name("tradeoff.ipynb")
OUT = Path("results") / "notebook" / NOTEBOOK.name  # the executed copy, from the project root; git-ignored
INJECTED = "injected-parameters"


def inject_parameters(nb, params: dict[str, Any]) -> None:
    """Put `NAME = value` lines in a cell tagged 'injected-parameters' right after the 'parameters' cell
    (papermill's convention), replacing an earlier injected cell."""
    import nbformat

    nb.cells = [c for c in nb.cells if INJECTED not in c.get("metadata", {}).get("tags", [])]
    at = next(
        (i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None
    )
    if at is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED]})
    nb.cells.insert(at + 1, cell)


def execute(
    params: dict[str, Any]
    | None = None,  # notebook parameters, e.g. {"PROJECT_DIR": "/path", "SELECT": "latest"}
    notebook: str | Path = NOTEBOOK,
    out: str | Path | None = None,  # where to write the executed notebook; None: not written
    timeout: int = 600,  # seconds per cell
):
    """Execute `notebook` in a 'python3' kernel, which jupyter_client starts with this interpreter
    (sys.executable), from the notebook's folder; returns the executed NotebookNode. A failing cell raises
    nbclient's CellExecutionError naming it."""
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    if params:
        inject_parameters(nb, params)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    )
    client.execute()
    if out is not None:
        nbformat.write(nb, out)
    return nb


def png_outputs(nb) -> list[bytes]:
    """Every image/png an executed notebook displayed, decoded."""
    return [
        base64.b64decode(o["data"]["image/png"])
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.notebook", description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MLflow tracking URI (default: sqlite:///<project>/mlflow.db)")
    ap.add_argument("--project", help="DVC project directory (default: this notebook's project)")
    ap.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment name (default: tracking.experiment of the project's params.yaml, else cfg-lab)",
    )
    ap.add_argument("--select", default=None, help="'workspace', 'latest' or a DVC experiment name")
    ap.add_argument(
        "--method",
        default=None,
        help="the guidance method whose curves the figures, frontiers and findings read (default: cfg, or the "
        "study's only method)",
    )
    ap.add_argument("--figures", help="also save the figures as PNG in this folder")
    ap.add_argument("--out", help=f"write the executed notebook here (default: {OUT}, under --project)")
    args = ap.parse_args(argv)
    params = {
        "TRACKING_URI": args.uri,
        "PROJECT_DIR": str(Path(args.project).resolve()) if args.project else None,
        "EXPERIMENT": args.experiment,
        "SELECT": args.select,
        "METHOD": args.method,
        "FIGURES_DIR": str(Path(args.figures).resolve()) if args.figures else None,
    }
    out = Path(args.out) if args.out else Path(args.project or NOTEBOOK.parent.parent) / OUT
    if out.resolve() == NOTEBOOK:
        raise SystemExit(
            f"error: --out {args.out} is the tracked notebook; executed copies go elsewhere ({OUT})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = execute({k: v for k, v in params.items() if v is not None}, out=out)
    print(f"executed {NOTEBOOK.name}: {len(png_outputs(nb))} figures -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
