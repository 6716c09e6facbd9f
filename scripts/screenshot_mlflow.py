"""Screenshot of the MLflow UI comparing one study's cell runs: docs/mlflow_compare.png.

Starts `mlflow server` on a free localhost port against the store, opens the compare view of the study's cell
runs (one per (p_uncond, w)) in headless Chromium, sets its parallel-coordinates plot to the parameters
p_uncond and w and the metrics fid and is, and saves the page as a 256-colour PNG. Chromium is driven over the
DevTools protocol with aiohttp (a DVC dependency), so nothing beyond Debian's `chromium` package is needed.

    python scripts/screenshot_mlflow.py [--uri URI] [--project DIR] [--select workspace] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `analysis` from this checkout

from analysis.mlflow_ui import mlflow_server, rest  # noqa: E402
from analysis.tradeoff import load_runs, select  # noqa: E402
from cfg.study.store import tracking_uri  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# the compare view's parallel-coordinates plot: these parameters and metrics on its axes
PARAMS = ["p_uncond", "w"]
METRICS = ["fid", "is"]


class DevTools:
    """The few DevTools protocol calls a screenshot needs, on one page's websocket."""

    def __init__(self, ws) -> None:
        self.ws, self.n = ws, 0

    async def send(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:  # events arrive in between; skip them
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        out = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r} within {timeout_s:g} s")
            await asyncio.sleep(0.5)

    async def key(self, name: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code
            )


# the selected items of the i-th select box (0: parameters, 1: metrics)
_ITEMS = "[...document.querySelectorAll('.du-bois-light-select')][{i}].querySelectorAll('.du-bois-light-select-selection-item')"


async def _set_select(page: DevTools, i: int, wanted: list[str]) -> None:
    """Make the i-th select box of the plot hold exactly `wanted`: remove the others, type in the missing."""
    items = _ITEMS.format(i=i)
    have = await page.js(f"[...{items}].map(e => e.innerText.trim())")
    for name in [h for h in have if h not in wanted]:
        await page.js(
            f"[...{items}].find(e => e.innerText.trim() === {json.dumps(name)})"
            ".querySelector('.du-bois-light-select-selection-item-remove').click()"
        )
    for name in [w for w in wanted if w not in have]:
        await page.js(f"document.querySelectorAll('.du-bois-light-select input')[{i}].focus()")
        await page.send("Input.insertText", text=name)
        await page.wait_for(
            f"[...document.querySelectorAll('.du-bois-light-select-item-option')]"
            f".some(e => e.innerText.trim() === {json.dumps(name)})",
            timeout_s=10,
        )
        # the typed name is the first option when it matches exactly
        await page.js(
            "[...document.querySelectorAll('.du-bois-light-select-item-option')]"
            f".find(e => e.innerText.trim() === {json.dumps(name)}).click()"
        )
        await page.key("Escape", 27)
    await page.js("document.activeElement && document.activeElement.blur()")


async def _shoot(chromium: str, url: str, out: Path, width: int, height: int) -> None:
    import aiohttp

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{chromium} did not open its DevTools port")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    target = next(t for t in await r.json() if t["type"] == "page")
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = DevTools(ws)
                    await page.send(
                        "Emulation.setDeviceMetricsOverride",
                        width=width,
                        height=height,
                        deviceScaleFactor=1,
                        mobile=False,
                    )
                    await page.send("Page.navigate", url=url)
                    await page.wait_for("!!document.querySelector('.js-plotly-plot')")
                    # the assistant side panel, when open, takes a third of the width
                    await page.js(
                        "[...document.querySelectorAll('button')]"
                        ".find(b => b.getAttribute('aria-label') === 'Close')?.click()"
                    )
                    # the tables below: only the parameters and metrics that differ between the runs
                    for table in ("Parameters", "Metrics"):
                        await page.js(
                            f"document.querySelector('[aria-label=\"{table} - Show diff only\"]')?.click()"
                        )
                    await _set_select(page, 0, PARAMS)
                    await _set_select(page, 1, METRICS)
                    await asyncio.sleep(2)  # plotly redraws
                    shot = await page.send("Page.captureScreenshot", format="png")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(out, optimize=True)


def screenshot(
    uri: str | None = None,  # MLflow store; default: the project's
    project: str | Path | None = None,  # DVC project; default: this checkout
    which: str = "workspace",  # the study (analysis.tradeoff.select)
    out: str | Path = ROOT / "docs" / "mlflow_compare.png",
    experiment: str = "cfg-lab",
    width: int = 1400,  # viewport, pixels
    height: int = 1500,
    chromium: str
    | None = None,  # browser binary; default: chromium, chromium-browser or google-chrome on PATH
) -> Path:
    """Save the compare view of the study's cell runs as `out`; returns its path."""
    project = Path(project).resolve() if project else ROOT
    uri = uri or tracking_uri(root=project)
    chromium = chromium or next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if chromium is None:
        raise FileNotFoundError("no Chromium on PATH: apt-get install -y chromium")
    study = select(load_runs(uri, project, experiment), which)
    run_ids = study.loc[study["source"] == "mlflow", "run_id"].tolist()
    if not run_ids:
        raise ValueError(f"the study {which!r} has no MLflow cell runs in {uri}")
    with mlflow_server(uri) as base:
        exp_id = rest(base, f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")
        query = urllib.parse.urlencode(
            {"runs": json.dumps(run_ids), "experiments": json.dumps([exp_id["experiment"]["experiment_id"]])}
        )
        asyncio.run(_shoot(chromium, f"{base}/#/compare-runs?{query}", Path(out), width, height))
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="MLflow tracking URI (default: sqlite:///<project>/mlflow.db)")
    ap.add_argument("--project", help="DVC project directory (default: this checkout)")
    ap.add_argument("--select", default="workspace", help="'workspace', 'latest' or a DVC experiment name")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mlflow_compare.png"), help="PNG to write")
    ap.add_argument("--experiment", default="cfg-lab", help="MLflow experiment name")
    args = ap.parse_args()
    path = screenshot(args.uri, args.project, args.select, args.out, args.experiment)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
