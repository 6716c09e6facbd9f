"""A throwaway PostgreSQL server for tests: initdb and pg_ctl from /usr/lib/postgresql/<version>/bin.

The server runs as the `postgres` user when the tests run as root (PostgreSQL refuses root), listens on
127.0.0.1 at a free port with trust authentication and fsync off, and is deleted when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SEARCH_GLOB = "/usr/lib/postgresql/*/bin"


def server_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian layout), or None."""
    found = sorted(Path("/").glob(SEARCH_GLOB.lstrip("/")), key=lambda p: int(p.parent.name))
    found = [p for p in found if (p / "initdb").exists() and (p / "pg_ctl").exists()]
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yields its URL without a database name, e.g. postgresql://postgres@127.0.0.1:5433."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise FileNotFoundError(f"no PostgreSQL server binaries under {SEARCH_GLOB}")
    as_user: list[str] = []
    # a private folder under /tmp: pytest's tmp_path is not reachable by another user
    root = Path(tempfile.mkdtemp(prefix="cfg-lab-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {port} -k {root} -h 127.0.0.1 -F"
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}"
        finally:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE name on the server; returns its URL."""
    import psycopg2

    con = psycopg2.connect(f"{server_url}/postgres")
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    return f"{server_url}/{name}"
