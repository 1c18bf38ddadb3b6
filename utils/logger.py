"""Logging to the console and to `<run>/train_log.txt` (or another file), on the main process only."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logger(log_file: Optional[str] = None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """The project logger 'php': console + optional file on rank 0, warnings only elsewhere.

    Python warnings (e.g. the compatibility-mode warning) are routed into the same handlers.
    """
    logger = logging.getLogger("php")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = logger.handlers
    warnings_logger.propagate = False
    return logger
