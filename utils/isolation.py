"""Calling a function in a fresh process, so that whatever it reads cannot change the caller or the next call.

`sh run.sh test` evaluates each run folder this way when it evaluates several: a checkpoint, a config or a plug-in
of one run then cannot change the numbers of another (torch's functions, module state, RNGs, the allocator),
whatever a loader lets through. The processes are forked from a forkserver started once per command, with the
project's modules already imported and no thread pool started, so each call costs a fork, not an interpreter
start (a process forked after torch's OpenMP pool has run can hang in its first matrix product).

The child's log records and warnings come back to the caller's handlers; a UserError comes back as one; any other
failure of the child, or its death, is a UserError that says so.
"""
from __future__ import annotations

import logging
import multiprocessing
import warnings
from typing import Any, Callable, Sequence

from utils.errors import UserError

_PRELOAD = ["torch", "evaluation.runs"]


class _PipeHandler(logging.Handler):
    """Sends each record, formatted into its message, to the parent."""

    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info, record.exc_text = self.format(record), None, None, None
        self.conn.send(("log", record))


def _child(conn, level: int, fn: Callable, args: Sequence[Any]) -> None:
    root = logging.getLogger()
    for logger in [root] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        for handler in list(getattr(logger, "handlers", [])):
            logger.removeHandler(handler)
    handler = _PipeHandler(conn)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = ("result", fn(*args))
        except UserError as e:
            result = ("user_error", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the parent as the call's failure
            result = ("error", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    for w in caught:
        conn.send(("warning", (str(w.message), w.category, w.filename, w.lineno)))
    conn.send(result)
    conn.close()


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def call_isolated(fn: Callable, *args: Any, logger_name: str = "php") -> Any:
    """fn(*args) in a fresh process (`fn` importable by name, args and result picklable)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    receiver, sender = ctx.Pipe(duplex=False)
    level = logging.getLogger(logger_name).getEffectiveLevel()
    process = ctx.Process(target=_child, args=(sender, level, fn, args), daemon=True)
    process.start()
    sender.close()
    try:
        while True:
            try:
                kind, value = receiver.recv()
            except EOFError:
                process.join()
                raise UserError(f"the process evaluating it died (exit code {process.exitcode})") from None
            if kind == "log":
                logging.getLogger(value.name).handle(value)
            elif kind == "warning":
                warnings.warn_explicit(value[0], value[1], value[2], value[3])
            else:
                break
    finally:
        if process.is_alive():
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        receiver.close()
    if kind == "result":
        return value
    if kind == "user_error":
        raise UserError(value)
    raise UserError(f"unexpected {value} (rerun with --debug)")
