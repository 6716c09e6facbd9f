"""A throw-away MLflow tracking server on localhost, its REST API and a headless Chromium page, for tests and
screenshots.

`python -m cfg.study.tracking ui` is the interactive way to open the UI; this module starts the same lean
`mlflow server` (`cfg.study.ui.server_command`: one worker, no job runner) from Python, waits until it answers,
and stops it with all its processes. `chromium_page` drives headless Chromium over the DevTools protocol with
aiohttp (a DVC dependency), so nothing beyond Debian's `chromium` package is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from cfg.study.ui import server_command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base: str, endpoint: str, payload: dict | None = None, timeout: float = 30) -> dict:
    """Call the tracking REST API: POST `payload` as JSON to `base`/api/2.0/mlflow/`endpoint`, or GET without
    one (then `endpoint` may carry a query string); the decoded JSON answer."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def search_runs(base: str, experiment_id: str, filter_string: str = "") -> list[dict]:
    """Every run of the experiment matching `filter_string` (MLflow search syntax), all pages."""
    runs, token = [], None
    while True:
        payload = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
        out = rest(base, "runs/search", payload | ({"page_token": token} if token else {}))
        runs += out.get("runs", [])
        token = out.get("next_page_token")
        if not token:
            return runs


@contextmanager
def mlflow_server(
    uri: str,  # backend store, e.g. sqlite:////abs/path/mlflow.db
    port: int | None = None,  # None: a free port
    startup_s: float = 180,  # how long to wait for the server to answer (slow on 2 busy cores)
    log: str | Path | None = None,  # file for the server's output; None: discarded
    artifacts: str | Path | None = None,  # --artifacts-destination: artifacts served through this server
) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 against `uri`; yields its base URL and stops its whole process group."""
    port = port or free_port()
    cmd, env = server_command(uri, "127.0.0.1", port)
    if artifacts:
        cmd += ["--artifacts-destination", str(artifacts)]
    out = open(log, "w") if log else subprocess.DEVNULL  # closed in the finally below
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server on {base} did not answer within {startup_s:g} s")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)
        if log:
            out.close()


def _stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL what is left after grace_s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers outliving the parent
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium

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


def chromium_binary() -> str | None:
    """chromium, chromium-browser or google-chrome on PATH; None without one."""
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


class DevTools:
    """The few DevTools protocol calls a test or a screenshot needs, on one page's websocket."""

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
        """The value of a JavaScript expression in the page (promises awaited)."""
        out = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 90) -> None:
        """Poll until the expression is truthy (the page renders asynchronously); TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not await self.js(
            f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression!r} within {timeout_s:g} s")
            await asyncio.sleep(0.5)

    async def key(self, name: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code
            )

    async def open(self, url: str) -> None:
        """Navigate to `url` and wait for the MLflow UI to render; closes the assistant side panel, which
        opens on a first visit and takes a third of the width."""
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.querySelector('[role=\"grid\"], .js-plotly-plot') !== null")
        await self.js(
            "[...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Close')?.click()"
        )


def _stop_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the process group `proc` leads (SIGKILL after timeout_s), then wait until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # any member left?
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)


@asynccontextmanager
async def chromium_page(
    width: int = 1400,  # viewport, pixels
    height: int = 1000,
    chromium: str | None = None,  # browser binary; None: `chromium_binary()`
) -> AsyncIterator[DevTools]:
    """A page of a headless Chromium started for the block (own profile, stopped afterwards)."""
    import aiohttp

    chromium = chromium or chromium_binary()
    if chromium is None:
        raise FileNotFoundError("no Chromium on PATH: apt-get install -y chromium")
    # the profile is removed afterwards; a file a helper process wrote late must not fail the caller
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        argv = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{chromium} did not open its DevTools port")
                await asyncio.sleep(0.1)
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
                    yield page
        finally:
            # the browser and its renderer, GPU and utility processes (one process group), which write into
            # the profile until they exit: stop them all before the profile is removed
            _stop_group(proc)
