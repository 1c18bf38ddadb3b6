"""Run folders: finding them, loading them, evaluating them, and the summary table (`sh run.sh test`).

A run folder holds `configs.yaml` and `best.pth` (this project's runs, and published IRRA / PHP folders alike).
`evaluate_folders` evaluates each on the test split of its own data set (its own data-set options and plug-ins,
the command line's options applied on top) and returns one summary row per run and compat mode; a run that cannot
be evaluated gets a row with the reason. A published PHP run gives two rows: compat `php_v1` (the reference
protocol: EFP attention across the batch, test split in file order at the config's test_batch_size; SPEC 8) and
`none` (batch-independent embeddings), unless one compat mode is asked for. `write_summary` prints the table and
writes it to ./logs/summary.md and ./logs/summary.csv (relative to the current folder).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from datasets import dataset_from_config
from datasets.loaders import build_eval_loaders
from evaluation.evaluator import Evaluator
from evaluation.eval_log import append_evaluation, count_test_evaluations
from evaluation.search import shown_path
from evaluation.testing import run_changes
from evaluation.summary import METRICS, Row, csv_table, experiment_key, markdown_table, with_groups
from model import load_model
from model.layouts import LAYOUTS, recognised_layout, run_files, translate_published_config
from model.loading import CompatibilityWarning, LoadedRun
from utils.config import Config, config_from_values, read_yaml
from utils.env import resolve_device
from utils.errors import UserError
from utils import isolation
from utils.files import write_atomic
from utils.provenance import git_state, sha256_file
from utils.runlock import FolderBusy, RunLock

logger = logging.getLogger("php")
LOGS = "logs"
# The options every data set's builder may read; a plug-in data set's own options are added per run.
DATA_KEYS = ("dataset_name", "root_dir", "annotation_file", "val_holdout_ids", "skip_missing_images", "demo_seed",
             "custom_imports")


@dataclass(frozen=True)
class EvaluationRequest:
    """What `sh run.sh test` was asked: the run folders (none: every one under ./logs), options for every run."""

    runs: Sequence[str] = ()
    overrides: Dict[str, Any] = field(default_factory=dict)
    compat: str = "auto"
    trusted: bool = False
    debug: bool = False


def discover_runs(logs_dir: str = LOGS) -> List[str]:
    """Every folder under `logs_dir` (any depth) that holds a run: configs.yaml and best.pth, or the files a
    published layout names (model/layouts.py run_files: TBPS-CLIP's config.yaml and checkpoint_best.pth); sorted."""
    found = []
    pairs = run_files()
    for folder, _, files in os.walk(logs_dir):
        if any(config in files and checkpoint in files for config, checkpoint in pairs):
            found.append(os.path.normpath(folder))
    return sorted(found)


def runs_to_evaluate(runs: Sequence[str]) -> List[str]:
    """The run folders named, else every one found under ./logs; at least one."""
    runs = list(runs) or discover_runs()
    if not runs:
        raise UserError(f"no run folders under ./{LOGS} (folders holding configs.yaml and best.pth); put one there, "
                        f"e.g. {LOGS}/ICFG-PEDES/irra_icfg/, or name run folders on the command line")
    return runs


def is_config_file(run: str) -> bool:
    return os.path.isfile(run) and run.endswith((".yaml", ".yml"))


def run_label(run: str) -> str:
    """How a run is named in the summary: its folder, relative to the current folder when inside it."""
    return shown_path(os.path.dirname(os.path.abspath(run)) if is_config_file(run) else run)


def config_path(run: str) -> str:
    """The config of a run folder: its configs.yaml, or the config.yaml beside TBPS-CLIP's checkpoint_best.pth (a
    path to the YAML file itself is accepted too)."""
    if is_config_file(run):
        return run
    if not os.path.isdir(run):
        raise UserError(f"run folder not found: {run}")
    for config, checkpoint in run_files():
        if os.path.isfile(os.path.join(run, config)) and (config == "configs.yaml" or
                                                          os.path.isfile(os.path.join(run, checkpoint))):
            return os.path.join(run, config)
    others = " or ".join(f"{c} with {k}" for c, k in run_files() if c != "configs.yaml")
    raise UserError(f"run folder {run} has no configs.yaml{f' (nor {others})' if others else ''}")


def run_config(run: str, overrides: Dict[str, Any]) -> Config:
    """The run's options (its configs.yaml, its plug-ins imported, then `overrides`), read without its checkpoint:
    enough to find its data."""
    path = config_path(run)
    return config_from_values(run_values(run), path, overrides, path, check=False)


def run_values(run: str) -> Dict[str, Any]:
    """The values of the run's config file, TBPS-CLIP's nested ones translated (nothing imported)."""
    path = config_path(run)
    values = read_yaml(path)
    layout = recognised_layout(values)
    if layout is not None:  # a release's config.yaml of its own shape (TBPS-CLIP's nested one): its meaning here
        values = translate_published_config(values, layout, path)
    return values


def load_run(run: str, request: EvaluationRequest, device: str, compat: str) -> LoadedRun:
    """The run folder's model, with the request's options applied to it, in `compat` mode."""
    loaded = load_model(config_path(run), device=device, compat=compat, overrides=dict(request.overrides),
                        trusted=request.trusted)
    if "num_workers" not in request.overrides:
        # Published configs carry their authors' worker count (8); more workers than cores only adds start-up.
        loaded.cfg.num_workers = min(loaded.cfg.num_workers, available_cpus())
    return loaded


def failure_message(error: Exception, debug: bool) -> str:
    """The one line that says why a run (or a cell) failed; with `debug` the error itself, for its traceback."""
    if debug:
        raise error
    if isinstance(error, UserError):
        return str(error)
    return f"unexpected {type(error).__name__}: {(str(error).splitlines() or [''])[0]} (rerun with --debug)"


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SplitCache:
    """Test splits parsed once per data set (every option its builder reads) and shared by the runs that read it."""

    def __init__(self) -> None:
        self._splits: Dict[str, object] = {}

    def get(self, cfg: Config) -> Tuple[dict, Optional[str]]:
        """(the test split, the annotation file it came from)."""
        values = {k: getattr(cfg, k) for k in [*DATA_KEYS, *cfg.plugin_options]}
        for key in ("root_dir", "annotation_file"):
            values[key] = os.path.abspath(values[key]) if values[key] else ""
        key = repr(sorted(values.items()))
        if key not in self._splits:
            try:
                dataset = dataset_from_config(cfg)
                self._splits[key] = (dataset.split("test"), dataset.annotation_file)
            except UserError as e:
                self._splits[key] = str(e)  # a missing data set is reported once per run, looked up once
        value = self._splits[key]
        if isinstance(value, str):
            raise UserError(value)
        return value

    def share(self, run: str, request: EvaluationRequest) -> "SplitCache":
        """A cache holding only `run`'s split, for a process of its own. The split is read here (once for the
        runs that share it) when reading the run's options imports nothing; a run with plug-ins reads it there,
        so that its plug-ins never run in this process."""
        part = SplitCache()
        if not request.overrides.get("custom_imports") and not run_values(run).get("custom_imports"):
            self.get(run_config(run, request.overrides))
            part._splits = self._splits
        return part


def compat_modes(run: LoadedRun, requested: str) -> List[str]:
    """The compatibility modes to evaluate a loaded run in, in row order: a published run's own mode, then 'none'
    (unless one mode is asked for)."""
    reference = LAYOUTS[run.layout].mode
    if requested == "auto" and reference != "none":
        return [reference, "none"]
    return [run.compat]


def mode_note(compat: str, cfg: Config, metrics: dict) -> str:
    """The note of a successful row: the reference protocol it followed, queries left out of the means."""
    notes = []
    if compat != "none":
        notes.append(f"batch-dependent, as the release ({compat}): file order, test_batch_size {cfg.test_batch_size}")
    if metrics.get("num_queries_without_match"):
        notes.append(f"{metrics['num_queries_without_match']} queries without a match left out")
    return "; ".join(notes)


def evaluate_modes(run: LoadedRun, modes: Sequence[str], loaders: Sequence[Iterable], desc: str = "eval"
                   ) -> Dict[str, dict]:
    """t2i metrics (as `retrieval_metrics` returns them) of the run's model in each compat mode, from one pass
    over `loaders` (the image loader, the text loader): the evaluator of test.py, in several modes."""
    return Evaluator(*loaders, precision=run.cfg.precision, desc=desc).evaluate_modes(run.model, modes)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The project's commit (12 characters) that evaluates, '+dirty' when the checkout has uncommitted files."""
    commit, dirty = git_state()
    return "" if commit is None else commit[:12] + ("+dirty" if dirty else "")


def log_evaluations(run_dir: str, checkpoint_sha256: str, rows: Sequence[Row]) -> int:
    """Append the rows' results to the run's test_log.jsonl and return how many evaluations of its test split it
    records. A folder that cannot be written (read-only) keeps its log as it is, with a warning: the evaluation
    itself still counts for the summary."""
    try:
        for row in rows:
            append_evaluation(run_dir, kind="test", checkpoint_sha256=checkpoint_sha256, compat=row.compat,
                              results={"t2i": row.metrics}, via="sh run.sh test", commit=row.commit)
    except UserError as e:
        logger.warning("%s: this evaluation is not recorded in its test_log.jsonl (%s)", run_dir, e)
    return count_test_evaluations(run_dir)


@contextlib.contextmanager
def folder_lock(run_dir: str) -> Iterator[None]:
    """Hold the run folder's lock while it is evaluated: a run another process writes (training: its best.pth may
    be of an early epoch) is not evaluated but named as busy; a folder that cannot be locked at all (read-only, a
    published copy) is evaluated without the lock."""
    try:
        lock = RunLock(run_dir, "sh run.sh test")
        lock.__enter__()
    except FolderBusy as e:
        raise UserError(f"busy, not evaluated: {e}") from None
    except UserError as e:
        logger.warning("%s: evaluated without its lock (%s)", run_dir, e)
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def evaluate_folder(run: str, request: EvaluationRequest, cache: SplitCache, device: str) -> List[Row]:
    """The rows of one run folder; raises UserError when the run cannot be evaluated."""
    label = run_label(run)
    run_dir = os.path.dirname(os.path.abspath(config_path(run)))
    split, annotation_file = cache.get(run_config(run, request.overrides))  # before the checkpoint: cheap to fail
    with folder_lock(run_dir):
        loaded = load_run(run, request, device, request.compat)
        cfg = loaded.cfg
        modes = compat_modes(loaded, request.compat)
        logger.info("evaluating %s on %s (compat %s)", label, cfg.dataset_name, " and ".join(modes))
        results = evaluate_modes(loaded, modes, build_eval_loaders(cfg, split), label)
        changes = run_changes(loaded, annotation_file)
        for change in changes[len(loaded.changes):]:
            logger.warning("%s: %s: its results may differ from the trained run's", label, change)
        experiment, checkpoint = experiment_key(cfg.to_dict()), sha256_file(loaded.checkpoint_path)
        rows = [Row(label, cfg.dataset_name, mode, {k: float(results[mode][k]) for k in METRICS},
                    "; ".join(n for n in [mode_note(mode, cfg, results[mode]), *changes] if n), commit=code_version(),
                    checkpoint=checkpoint[:12], experiment=experiment, name=cfg.name, seed=cfg.seed,
                    checkpoint_sha256=checkpoint, noise=noise_of(cfg, run_dir, loaded.trained_with))
                for mode in modes]
        tested = log_evaluations(run_dir, checkpoint, rows)
    for row in rows:
        row.tested = tested
    return rows


def noise_of(cfg: Config, run_dir: Optional[str] = None, trained_with: Optional[Dict[str, Any]] = None) -> str:
    """The summary's noise cell: the noisy_rate a run trained with, '' when clean. With a noisy_file, the file
    decides (noisy_rate may say 0): the rate its checkpoint records (`trained_with`, its provenance), else the
    share of noisy pairs in the run's noisy_pairs.npy (runs that predate the record), '?' when neither is there;
    the file's name follows."""
    if not cfg.noisy_file:
        return f"{cfg.noisy_rate:g}" if cfg.noisy_rate > 0 else ""
    rate = (trained_with or {}).get("noisy_rate")
    if not isinstance(rate, (int, float)):
        rate = recorded_noise_share(run_dir or cfg.run_dir)
    return f"{'?' if rate is None else f'{rate:.3g}'} ({os.path.basename(cfg.noisy_file)})"


def recorded_noise_share(run_dir: str) -> Optional[float]:
    """The share of pairs that noisy_pairs.npy (processor/training.py) says carry another pair's caption."""
    try:
        permutation = np.load(os.path.join(run_dir, "noisy_pairs.npy"), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(permutation, np.ndarray) or permutation.ndim != 1 or not len(permutation):
        return None
    return float(np.mean(permutation != np.arange(len(permutation))))


def failed_row(run: str, request: EvaluationRequest, message: str) -> Row:
    """A row that says why `run` was not evaluated (with its data set when the config could be read)."""
    dataset = ""
    try:  # the file's value: reading the run's config in full would import its plug-ins here
        dataset = str(request.overrides.get("dataset_name") or run_values(run).get("dataset_name", Config().dataset_name))
    except UserError:
        pass
    return Row(run_label(run), dataset, request.compat, None, f"error: {message}")


def evaluate_folders(request: EvaluationRequest) -> List[Row]:
    """Rows of every run folder named (or found under ./logs), in order; a failing run becomes an error row."""
    runs = runs_to_evaluate(request.runs)
    device = str(resolve_device(str(request.overrides.get("device", "auto"))))
    cache = SplitCache()
    # Several runs are each evaluated in a process of their own: no file of one run can change another's numbers.
    isolate = len(runs) > 1 and not request.debug and isolation.available()
    rows: List[Row] = []
    with warnings.catch_warnings():
        # Every run evaluated in a batch-dependent mode warns, not only the first (Python shows a warning once a line).
        warnings.simplefilter("always", CompatibilityWarning)
        for run in runs:
            try:
                rows.extend(isolation.call_isolated(evaluate_folder, run, request, cache.share(run, request), device)
                            if isolate else evaluate_folder(run, request, cache, device))
            except Exception as e:  # noqa: BLE001 - one broken run must not stop the others
                message = failure_message(e, request.debug)
                logger.error("%s: %s", run_label(run), message)
                rows.append(failed_row(run, request, message))
    return rows


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a reader never sees half a summary), making its folder."""
    write_atomic(path, text, what="the summary", make_folder=True)


def write_summary(rows: Sequence[Row]) -> int:
    """Group the rows, print the table, write logs/summary.md and .csv; the number of failed rows."""
    rows = with_groups(rows)
    table = markdown_table(rows)
    print(table, end="")
    md_path, csv_path = os.path.join(LOGS, "summary.md"), os.path.join(LOGS, "summary.csv")
    write_text(md_path, table)
    write_text(csv_path, csv_table(rows))
    failed = sum(isinstance(row, Row) and row.failed for row in rows)
    logger.info("summary written to %s and %s%s", md_path, csv_path,
                f"; {failed} of {len(rows)} rows failed" if failed else "")
    return failed


def check_overrides(overrides: Dict[str, Any]) -> None:
    """Check the command line's options once, up front (names and types): a bad one is the command's error, not
    every run's. A plug-in's option needs its file in --custom_imports on the same command line."""
    config_from_values({}, "command line", overrides, check=False)
