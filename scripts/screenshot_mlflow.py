"""Screenshot of the MLflow UI's charts of one study: docs/mlflow_compare.png.

Starts the lean `mlflow server` on a free localhost port against the store, opens the study's charts view (the
link `make ui` prints: parallel coordinates p_uncond, w -> fid, is; FID and IS against w; IS against FID; the
cells' sample grids side by side) in headless Chromium, waits for the plots and the images, and saves the page
as a 256-colour PNG.

    python scripts/screenshot_mlflow.py [--uri URI] [--project DIR] [--select workspace] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `analysis` from this checkout

from analysis.mlflow_ui import chromium_page, mlflow_server  # noqa: E402
from analysis.tradeoff import load_runs, select  # noqa: E402
from cfg.study.store import tracking_uri  # noqa: E402
from cfg.study.ui import default_experiment, view_urls  # noqa: E402

# the page is drawn: the three scatter plots (plotly; the parallel coordinates are not) and the sample grids (of
# the first 10 cells: the UI's image card shows no more)
DRAWN = (
    "document.querySelectorAll('.js-plotly-plot').length >= 3 && "
    "[...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length >= {n}"
)


async def _shoot(url: str, out: Path, n_cells: int, width: int, height: int) -> None:
    async with chromium_page(width, height) as page:
        await page.open(url)
        await page.wait_for(DRAWN.replace("{n}", str(min(n_cells, 10))))
        await page.js("document.querySelector('[aria-label=\"Hide banner\"]')?.click()")  # 'a shared view'
        await asyncio.sleep(2)  # plotly's last redraw
        shot = await page.send("Page.captureScreenshot", format="png")
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(out, optimize=True)


def screenshot(
    uri: str | None = None,  # MLflow store; default: the project's
    project: str | Path | None = None,  # DVC project; default: this checkout
    which: str = "workspace",  # the study (analysis.tradeoff.select)
    out: str | Path = ROOT / "docs" / "mlflow_compare.png",
    experiment: str | None = None,  # default: the project's tracking.experiment
    width: int = 1400,  # viewport, pixels
    height: int = 1700,
) -> Path:
    """Save the charts view of the study's cell runs as `out`; returns its path."""
    from mlflow.tracking import MlflowClient

    project = Path(project).resolve() if project else ROOT
    uri = uri or tracking_uri(root=project)
    experiment = experiment or default_experiment(project)
    study = select(load_runs(uri, project, experiment), which)
    run_ids = study.loc[study["source"] == "mlflow", "run_id"].tolist()
    if not run_ids:
        raise ValueError(f"the study {which!r} has no MLflow cell runs in {uri}")
    key = MlflowClient(uri).get_run(run_ids[0]).data.tags.get("study")
    with mlflow_server(uri) as base:
        urls = view_urls(MlflowClient(uri), experiment, base, study=key)
        asyncio.run(_shoot(urls["charts"], Path(out), len(run_ids), width, height))
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MLflow tracking URI (default: sqlite:///<project>/mlflow.db)")
    ap.add_argument("--project", help="DVC project directory (default: this checkout)")
    ap.add_argument("--select", default="workspace", help="'workspace', 'latest' or a DVC experiment name")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mlflow_compare.png"), help="PNG to write")
    ap.add_argument(
        "--experiment", help="MLflow experiment name (default: the project's tracking.experiment)"
    )
    args = ap.parse_args()
    path = screenshot(args.uri, args.project, args.select, args.out, args.experiment)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
