"""`python -m cfg.study.tracking ui` in a browser: the lean server opens on the cells of the latest study.

On the tiny study's real store (tests/test_analysis.py: tiny_study, whose latest study is the DVC experiment
wide-w), the ui command starts `mlflow server` and prints two links, which headless Chromium opens. The runs
link must list exactly that study's cell runs, each row with the run's own p_uncond, w, fid and is; the charts
link must draw the parallel coordinates of p_uncond and w against fid and is and show every cell's sample grid.
The server must be lean: the mlflow command and one uvicorn worker, no job runner or huey consumers.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.mlflow_ui import _stop, chromium_binary, chromium_page, free_port, rest, search_runs

from .conftest import VENV_BIN
from .test_analysis import EXP_W, tiny_study

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium_binary() is None, reason="no Chromium")]

# the runs table's rows: ag-grid splits a row between the pinned name column and the rest (one row-id)
ROWS = (
    "[...document.querySelectorAll('.ag-row')].map(r => [r.getAttribute('row-id'), "
    "[...r.querySelectorAll('.ag-cell')].map(c => [c.getAttribute('col-id'), c.innerText])])"
)
COLUMNS = {"p_uncond": "params.`p_uncond`", "w": "params.`w`", "fid": "metrics.`fid`", "is": "metrics.`is`"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_study(tmp_path_factory)


def _links(log: Path, proc: subprocess.Popen, timeout_s: float = 180) -> dict[str, str]:
    """The links the ui command printed, once its server answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = dict(re.findall(r"^  (runs|charts)[^:]*: (\S+)$", log.read_text(), re.M))
        if len(found) == 2:
            try:
                with urllib.request.urlopen(found["runs"].split("/#/")[0] + "/health", timeout=5) as r:
                    if r.status == 200:
                        return found
            except OSError:
                pass
        assert proc.poll() is None, f"the ui command exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no links and server within {timeout_s:g} s:\n{log.read_text()}"
        time.sleep(0.5)


def test_ui_opens_on_the_cells_of_the_latest_study_with_fid_and_is(tiny, tmp_path):
    port, log = free_port(), tmp_path / "ui.log"
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cfg.study.tracking", "ui", "--port", str(port)],
            cwd=tiny,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        links = _links(log, proc)
        base = links["runs"].split("/#/")[0]
        assert base == f"http://127.0.0.1:{port}" and "runs of the latest study" in log.read_text()
        exp = rest(base, "experiments/get-by-name?experiment_name=cfg-lab")["experiment"]["experiment_id"]
        (study,) = search_runs(base, exp, "tags.run_kind = 'study' and attributes.run_name = 'wide-w'")
        study_id = study["info"]["run_id"]
        cells = {
            c["info"]["run_id"]: c
            for c in search_runs(base, exp, "tags.run_kind = 'cell'")
            if {t["key"]: t["value"] for t in c["data"]["tags"]}["mlflow.parentRunId"] == study_id
        }
        assert len(cells) == 2 * len(EXP_W)
        table, charts = asyncio.run(_browse(links))
        processes = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-s", str(proc.pid)], capture_output=True, text=True
        ).stdout.splitlines()
    finally:
        _stop(proc)

    # the runs link: the study's cells, and only those, each with its own values in the four columns
    assert set(table) == set(cells), "the rows are the latest study's cell runs"
    for run_id, row in table.items():
        cell = cells[run_id]
        params = {p["key"]: p["value"] for p in cell["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in cell["data"]["metrics"]}
        assert row["attributes.`Run Name`"].endswith(
            f"p_uncond={float(params['p_uncond']):g} w={float(params['w']):g}"
        )
        assert float(row[COLUMNS["p_uncond"]]) == float(params["p_uncond"])
        assert float(row[COLUMNS["w"]]) == float(params["w"])
        assert float(row[COLUMNS["fid"]]) == pytest.approx(metrics["fid"], rel=1e-12)
        assert float(row[COLUMNS["is"]]) == pytest.approx(metrics["is"], rel=1e-12)
    # the charts link: the parallel coordinates of p_uncond, w, fid, is and every cell's sample grid, loaded
    parallel, samples, n_images = charts
    assert all(axis in parallel.split("\n") for axis in ("p_uncond", "w", "fid", "is")), parallel
    assert n_images == min(len(cells), 10), "the UI's image card shows the first 10 runs"
    assert sum(cell["info"]["run_name"] in samples.split("\n") for cell in cells.values()) == n_images
    # lean: the mlflow command and its one uvicorn worker
    assert len(processes) == 2 and "uvicorn" in processes[1] and "--workers 1" in processes[1], processes
    assert not any("huey" in p or "job_runner" in p for p in processes)


async def _browse(links: dict[str, str]) -> tuple[dict[str, dict[str, str]], tuple[str, str, int]]:
    async with chromium_page(width=1400, height=1400) as page:
        await page.open(links["runs"])
        await page.wait_for(
            'document.querySelectorAll(\'.ag-row[row-id*="."] .ag-cell[col-id="metrics.`fid`"]\').length > 0'
        )
        await asyncio.sleep(1)  # the last rows
        table: dict[str, dict[str, str]] = {}
        for row_id, cells in await page.js(ROWS):
            *group, run_id = row_id.split(".")
            if group and len(run_id) == 32:  # a run's row (not a group's) inside a group
                table.setdefault(run_id, {}).update(dict(cells))

        await page.open(links["charts"])
        await page.wait_for(
            "[...document.querySelectorAll('img')].filter(i => i.src.includes('get-artifact') && i.complete "
            "&& i.naturalWidth > 0).length > 0 && document.querySelectorAll('.js-plotly-plot').length >= 3"
        )
        await asyncio.sleep(2)  # the other images
        text = await page.js("document.body.innerText")
        n_images = await page.js(
            "[...document.querySelectorAll('img')].filter(i => i.src.includes('get-artifact') && i.complete "
            "&& i.naturalWidth > 0).length"
        )
    # the cards' text in page order: the parallel coordinates card up to the next card, the sample grids' card
    parallel = text.split("Parallel Coordinates", 1)[1].split("\nw vs. fid", 1)[0]
    samples = text.split("Sample grids", 1)[1]
    return table, (parallel, samples, n_images)
