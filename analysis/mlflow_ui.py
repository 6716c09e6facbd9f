"""A throw-away MLflow tracking server on localhost, and its REST API, for tests and screenshots.

`python -m cfg.study.tracking ui` is the interactive way to open the UI; this module starts the same `mlflow server`
from Python, lean (one worker, no job runner), waits until it answers, and stops it with all its processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--artifacts-destination", str(artifacts)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
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
