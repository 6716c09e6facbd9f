"""One log format for every cfg-lab process: Python logging, configured once by `setup` (stage scripts, the
search, the `cfg-lab` command), never at import.

Lines read `12:03:07 [train p_uncond=0.1 on cpu] 45% 360/800 steps, …`; warnings add `WARNING:`. Optuna's and
MLflow's loggers go through the same handler at WARNING, so their INFO lines ("Trial 3 finished …", "View run
…") no longer repeat what cfg-lab prints (Optuna's own handler is switched off by `cfg.search.quiet_optuna`,
since only cfg/search imports optuna).
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s [%(name)s] %(message)s"
DATEFMT = "%H:%M:%S"
# third-party loggers held at WARNING: their INFO lines repeat cfg-lab's own (optuna's trial results,
# mlflow's "View run" links, alembic's migrations of a new mlflow.db, git/urllib3 chatter)
QUIET = ("optuna", "mlflow", "alembic", "git", "urllib3", "httpx", "filelock", "matplotlib", "PIL", "numexpr")

_HANDLER_NAME = "cfg-lab"


class _Formatter(logging.Formatter):
    """FORMAT, with `WARNING:` / `ERROR:` before the message of records at those levels."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            head = f"[{record.name}] "
            line = line.replace(head, f"{head}{record.levelname}: ", 1)
        return line


def setup(level: int | str = logging.INFO) -> logging.Handler:
    """Install the one stderr handler on the root logger (once per process; later calls only set the level)
    and quieten the third-party loggers in QUIET."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(_Formatter(FORMAT, DATEFMT))
        root.addHandler(handler)
    root.setLevel(level)
    # mlflow installs its own handler when first imported unless told not to: its records then come here
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in QUIET:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if name == "mlflow" and "mlflow" in sys.modules:  # imported before setup: take its records over
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = True
    return handler


def get_logger(name: str) -> logging.Logger:
    """The logger of one stage or tool; its name is the bracketed label of its lines (e.g. 'classifier')."""
    return logging.getLogger(name)
