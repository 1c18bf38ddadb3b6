"""`<run>/test_log.jsonl`: one line per evaluation of a run on its test split, so a reviewer sees how often the
test split was looked at (every look is a chance to tune on it), not only the last result.

test.py (plain and --audit) and `sh run.sh test` append here, holding the run folder's lock. Each line is one JSON
object with at least `time` (ISO 8601, UTC), `kind`, `checkpoint_sha256`, `compat` and `results`.
"""
from __future__ import annotations

import json
import os
from typing import List

from utils.errors import UserError
from utils.provenance import utc_now

LOG_NAME = "test_log.jsonl"
KINDS = ("test", "audit")


def log_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOG_NAME)


def append_evaluation(run_dir: str, *, kind: str, checkpoint_sha256: str, compat: str, results: dict,
                      **extra) -> dict:
    """Append one evaluation of the test split to the run's log and return the entry written; `extra` (e.g.
    `provenance`) is added to it. A failed append is one UserError line, and leaves no partial line."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    entry = {"time": utc_now(), "kind": kind, "checkpoint_sha256": checkpoint_sha256, "compat": compat,
             "results": results, **extra}
    line = (json.dumps(entry, sort_keys=False) + "\n").encode("utf-8")
    path = log_path(run_dir)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot append to the test log {path} ({e.strerror or e})") from None
    try:
        _append_line(fd, line, path)
    finally:
        os.close(fd)
    return entry


def _append_line(fd: int, line: bytes, path: str) -> None:
    try:
        size = os.fstat(fd).st_size
        # A file that ends mid-line (written by hand, or torn by a crash of the file system) would swallow this
        # entry into its broken last line: start a line of our own, and the broken one alone is skipped.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        # One write on an O_APPEND descriptor: the line lands whole at the end, after any other writer's.
        written = os.write(fd, line)
    except OSError as e:
        raise UserError(f"cannot append to the test log {path} ({e.strerror or e}); it is unchanged") from None
    if written != len(line):
        # A short write (a full disk) left part of the line: cut it off again.
        try:
            os.ftruncate(fd, os.fstat(fd).st_size - written)
        except OSError:
            pass
        raise UserError(f"cannot append to the test log {path} (only {written} of {len(line)} bytes written; "
                        f"disk full?)")


def read_log(run_dir: str) -> List[dict]:
    """The entries of the run's test log, oldest first; a line that is not a JSON object (a corrupt or torn
    line) is skipped. No log: no entries."""
    path = log_path(run_dir)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"cannot read the test log {path} ({e.strerror or e})") from None
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def count_test_evaluations(run_dir: str) -> int:
    """How many times the run's test split was evaluated, by its test log (0 without one)."""
    return len(read_log(run_dir))
