"""Logging to the console and to `<run>/train_log.txt` (or another file), on the main process only."""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Held(logging.Handler):
    """Keeps records until the log file may be created (after every check of a run has passed)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _LogFile(logging.FileHandler):
    """A log file that, once a write fails (a full disk), says so on the console once and stops, instead of
    printing a traceback for every later line; the console keeps every line."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        logger = logging.getLogger("php")
        logger.removeHandler(self)
        logging.getLogger("py.warnings").handlers = logger.handlers
        logger.warning("cannot write the log file %s (%s); logging to the console only", self.baseFilename,
                       getattr(error, "strerror", None) or error)


def setup_logger(log_file: Optional[str] = None, rank: int = 0, level: int = logging.INFO,
                 hold: bool = False) -> logging.Logger:
    """The project logger 'php': console + optional file on rank 0, warnings only elsewhere.

    With `hold`, records are also kept in memory until `attach_log_file` writes them to the file: a run's log
    then starts with its first line although the file is created only once the run's checks have passed.
    Python warnings (e.g. the compatibility-mode warning) are routed into the same handlers.
    """
    logger = logging.getLogger("php")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_formatter())
    logger.addHandler(console)
    if log_file and rank == 0:
        _add_file(logger, log_file)
    elif hold and rank == 0:
        logger.addHandler(_Held())
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = logger.handlers
    warnings_logger.propagate = False
    return logger


def attach_log_file(logger: logging.Logger, log_file: str) -> None:
    """Start writing `logger` to `log_file` (appending), beginning with the records held so far."""
    held = [h for h in logger.handlers if isinstance(h, _Held)]
    handler = _add_file(logger, log_file)
    for h in held:
        for record in h.records:
            handler.handle(record)
        logger.removeHandler(h)
    logging.getLogger("py.warnings").handlers = logger.handlers


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, datefmt="%H:%M:%S")


def _add_file(logger: logging.Logger, log_file: str) -> logging.Handler:
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    handler = _LogFile(log_file, mode="a", encoding="utf-8")
    handler.setFormatter(_formatter())
    logger.addHandler(handler)
    return handler
