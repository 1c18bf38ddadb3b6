"""The methods table's files: its rows (MethodRow) as Markdown and CSV, the header that says where and how it was made,
and writing both files while holding the table's lock, with the rows another `sh run.sh methods` wrote to the same
table while this one ran (processor/methods.py makes the rows).
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from evaluation.metrics import METRIC_KEYS
from evaluation.runs import code_version
from processor.parallel_runs import threads_per_job
from processor.precision import cpu_description
from utils.errors import UserError
from utils.files import write_atomic
from utils.provenance import utc_now

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; the table is not locked
    fcntl = None

logger = logging.getLogger("php")


@dataclass
class MethodRow:
    method: str
    preset: str
    seeds: int = 0
    mean: Dict[str, float] = field(default_factory=dict)
    std: Dict[str, Optional[float]] = field(default_factory=dict)
    epoch_seconds: Optional[float] = None
    epochs: int = 0
    params_m: Optional[float] = None
    embedding: str = ""
    precision: str = ""
    noise: str = ""
    wall_seconds: float = 0.0
    note: str = ""


MD_COLUMNS = ("method", "preset", "seeds", *METRIC_KEYS, "s/epoch", "epochs", "params (M)", "embedding",
              "precision", "noise", "minutes", "note")
CSV_COLUMNS = ("method", "preset", "seeds", *(f"{k}_{s}" for k in METRIC_KEYS for s in ("mean", "std")),
               "epoch_seconds", "epochs", "params_m", "embedding", "precision", "noise", "wall_seconds", "note")


def _cell(row: MethodRow, key: str) -> str:
    if key not in row.mean:
        return "-"
    std = row.std.get(key)
    return f"{row.mean[key]:.2f}" if std is None else f"{row.mean[key]:.2f} ± {std:.2f}"


def _number(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[MethodRow], header: Sequence[str] = ()) -> str:
    """The header lines, then a GitHub-flavoured table: `mean ± std` over the seeds, the mean alone for one seed."""
    lines = list(header) + ([""] if header else [])
    lines += ["| " + " | ".join(MD_COLUMNS) + " |",
              "|" + "|".join("---" if c in ("method", "preset", "embedding", "precision", "note") else "---:"
                             for c in MD_COLUMNS) + "|"]
    for row in rows:
        cells = [row.method, row.preset, str(row.seeds), *(_cell(row, k) for k in METRIC_KEYS),
                 _number(row.epoch_seconds, 1), str(row.epochs or ""), _number(row.params_m, 2), row.embedding,
                 row.precision, row.noise, f"{row.wall_seconds / 60:.1f}", row.note]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[MethodRow]) -> str:
    """CSV with a header row, four decimals; a std is empty for one seed, the metrics for a failed method."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        stats = []
        for key in METRIC_KEYS:
            std = row.std.get(key)
            stats += [_number(row.mean.get(key), 4), _number(std, 4)]
        writer.writerow([row.method, row.preset, row.seeds, *stats, _number(row.epoch_seconds, 2), row.epochs or "",
                         _number(row.params_m, 4), row.embedding, row.precision, row.noise,
                         f"{row.wall_seconds:.1f}", row.note])
    return out.getvalue()


def table_header(command: str, dataset: str, seconds: float, jobs: int = 1) -> List[str]:
    """Where and how the table was made: the command, the data set, the CPU, torch, the commit, the date."""
    cpu = cpu_description()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in (cpu.get("flags") or {}).items())
    threads = (f"{jobs} runs side by side, {threads_per_job(jobs)} thread(s) each" if jobs > 1
               else f"{torch.get_num_threads()} threads")
    return [f"# Methods on {dataset}", "",
            f"`{command}`, {utc_now()}, commit {code_version() or 'unknown'}: {seconds / 60:.1f} minutes in all.",
            f"Machine: {cpu.get('model') or 'unknown CPU'} ({flags or 'flags unknown'}), {threads}, "
            f"torch {torch.__version__}.",
            "Metrics: the test split, text to image, mean ± sample std over the seeds; s/epoch: the median epoch of "
            "each run, averaged over seeds; minutes: the method's runs (training and testing), summed"
            + (" (they overlap other runs)" if jobs > 1 else "") + "."]


def write_tables(rows: Sequence[MethodRow], output_dir: str, stem: str, header: Sequence[str]) -> Tuple[str, str]:
    md, csv_path = table_paths(output_dir, stem)
    write_atomic(md, markdown_table(rows, header), what="the methods table", make_folder=True)
    write_atomic(csv_path, csv_table(rows), what="the methods table", make_folder=True)
    return md, csv_path


def table_paths(output_dir: str, stem: str) -> Tuple[str, str]:
    return os.path.join(output_dir, f"{stem}.md"), os.path.join(output_dir, f"{stem}.csv")


@contextlib.contextmanager
def table_lock(output_dir: str, stem: str) -> Iterator[str]:
    """Held while the table is read and rewritten, so that two `sh run.sh methods` writing one table take turns.
    Unlike a run folder's RunLock it waits: a write takes a moment. The file stays: removing it would let a process
    that opened it before the removal lock the old file while another locks a new one. Yields its path."""
    path = os.path.join(output_dir, f".{stem}.lock")
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path} ({e.strerror or e})") from None
    try:
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except OSError as e:
                raise UserError(f"cannot lock {path} ({e.strerror or e}); the file system may not support "
                                f"locks") from None
        yield path
    finally:
        os.close(fd)


def table_clock(output_dir: str, stem: str) -> float:
    """Now by the file system's clock, which files' times follow: it runs up to a tick behind time.time(), so a
    table written just after time.time() could seem older than it."""
    with table_lock(output_dir, stem) as path:
        os.utime(path)
        return os.stat(path).st_mtime


def row_from_csv(record: Dict[str, str]) -> MethodRow:
    """A row as csv_table wrote it (four decimals)."""
    def number(key: str) -> Optional[float]:
        return float(record[key]) if record[key] else None

    row = MethodRow(record["method"], record["preset"], int(record["seeds"] or 0),
                    epoch_seconds=number("epoch_seconds"), epochs=int(record["epochs"] or 0),
                    params_m=number("params_m"), embedding=record["embedding"], precision=record["precision"],
                    noise=record["noise"], wall_seconds=float(record["wall_seconds"] or 0), note=record["note"])
    for key in METRIC_KEYS:
        if record[f"{key}_mean"]:
            row.mean[key], row.std[key] = float(record[f"{key}_mean"]), number(f"{key}_std")
    return row


def rows_of_others(csv_path: str, since: float, ours: Sequence[str]) -> List[MethodRow]:
    """The rows of methods other than `ours` in a table that another `sh run.sh methods` wrote since `since` (a
    table_clock time: while this one ran): kept, so that of two commands that run at once the last to write
    drops nothing."""
    try:
        if os.stat(csv_path).st_mtime < since:
            return []
        with open(csv_path, newline="", encoding="utf-8") as f:
            return [row_from_csv(r) for r in csv.DictReader(f) if r.get("method") not in ours]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: not read (%s: %s); its rows are not kept", csv_path, type(e).__name__, e)
        return []
