"""The cross-domain matrix: every run evaluated on the test split of every data set found (`sh run.sh test --cross`).

Every run (the run folders named, or every folder under ./logs holding configs.yaml and best.pth) is evaluated on
the test split of every registered data set whose folder exists under the data root (nothing is generated there),
and on each annotation file given (`dataset_name: custom`, a JSON list or a CSV, see datasets/custom.py; the column
is named by the file name without extension).

Each run is loaded once and evaluated with its own settings (img_size, text_length, test_batch_size, precision);
each test set is parsed once for all runs. Embeddings are batch-independent (compat none) unless the request says
otherwise.

Written to ./logs/cross_domain.md (runs x test sets, R1 with the in-domain cell in bold, printed too) and
./logs/cross_domain.csv (one row per run and test set: run, trained_on, test_set, R1, R5, R10, mAP, mINP,
in_domain). A run that cannot be evaluated on a set gets an empty cell and a note saying why; the others still
run.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from datasets import DATASETS, dataset_from_config, found_under
from datasets.loaders import build_eval_loaders
from evaluation.metrics import METRIC_KEYS as METRICS
from evaluation.runs import (LOGS, EvaluationRequest, config_path, evaluate_modes, failure_message, folder_lock,
                             load_run, run_label, runs_to_evaluate, write_text)
from model.loading import CompatibilityWarning
from utils.config import Config, read_yaml
from utils.env import resolve_device
from utils.errors import UserError

MD_PATH = os.path.join(LOGS, "cross_domain.md")
CSV_PATH = os.path.join(LOGS, "cross_domain.csv")
CSV_COLUMNS = ("run", "trained_on", "test_set", *METRICS, "in_domain")
# The test sets come from --root_dir and --cross_datasets; one named on the command line would be ignored.
REFUSED = ("dataset_name", "annotation_file", "demo_seed")


@dataclass(frozen=True)
class TestSet:
    """One column of the matrix: a registered data set under the data root, or an annotation file."""

    name: str
    dataset_name: str
    annotation_file: str = ""  # absolute, for `custom`


@dataclass
class RunResult:
    """One row of the matrix: a run, the set it was trained on and its metrics per test set (None: failed)."""

    label: str
    trained_on: str = ""
    dataset_name: str = ""
    annotation_file: str = ""
    compat: str = ""
    cells: Dict[str, Optional[Dict[str, float]]] = field(default_factory=dict)

    def in_domain(self, test_set: TestSet) -> bool:
        if self.dataset_name != test_set.dataset_name:
            return False
        # Every custom set is `custom`: only the same annotation file makes it the training data.
        return test_set.dataset_name != "custom" or (os.path.isfile(self.annotation_file) and
                                                     os.path.samefile(self.annotation_file, test_set.annotation_file))


def find_test_sets(root_dir: str, files: Sequence[str]) -> List[TestSet]:
    """The registered data sets found under `root_dir`, then the annotation files, each checked to exist."""
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"--cross_datasets: annotation file {path} does not exist (expected a JSON list or a CSV "
                            f"of image path, person id, caption and split; see datasets/custom.py)")
    sets = [TestSet(name, name) for name in found_under(root_dir)]
    sets += [TestSet(os.path.splitext(os.path.basename(p))[0], "custom", os.path.abspath(p)) for p in files]
    if not sets:
        folders = [spec.layout.folder for spec in DATASETS.values() if spec.layout is not None]
        raise UserError(f"--cross: no data set found under {os.path.abspath(root_dir)} (looked for the folders "
                        f"{', '.join(folders)}, each with imgs/ and its annotation file); point --root_dir at the "
                        f"data or name annotation files with --cross_datasets")
    seen: Dict[str, TestSet] = {}
    for test_set in sets:
        other = seen.setdefault(test_set.name, test_set)
        if other is not test_set:
            raise UserError(f"--cross_datasets: two test sets would be named {test_set.name!r} "
                            f"({other.annotation_file or other.dataset_name} and {test_set.annotation_file}); "
                            f"rename one of the files")
    return sets


class CrossEvaluation:
    """Fills the matrix run by run, parsing each test set the first time a run needs it."""

    def __init__(self, request: EvaluationRequest, root_dir: str, skip_missing_images: bool,
                 logger: logging.Logger):
        self.request = request
        self.root_dir = root_dir
        self.skip_missing_images = skip_missing_images
        self.logger = logger
        self.debug = request.debug
        self.device = str(resolve_device(str(request.overrides.get("device", "auto"))))
        self.splits: Dict[TestSet, Union[dict, str]] = {}  # a set that cannot be parsed: the reason
        self.notes: List[str] = []

    def note(self, line: str) -> None:
        self.logger.error("%s", line)
        self.notes.append(line)

    def test_split(self, test_set: TestSet, cfg: Config) -> Optional[dict]:
        """The test split of `test_set` (None, noted once, when it cannot be parsed)."""
        if test_set not in self.splits:
            # The run's config carries its plug-ins' options; the data options are the test set's own.
            data_cfg = cfg.copy(dataset_name=test_set.dataset_name, root_dir=self.root_dir,
                                annotation_file=test_set.annotation_file, demo_seed=0, val_holdout_ids=0,
                                skip_missing_images=self.skip_missing_images)
            try:
                self.splits[test_set] = dataset_from_config(data_cfg).split("test")
            except Exception as e:  # noqa: BLE001 - a set that cannot be read leaves the other sets to run
                self.splits[test_set] = failure_message(e, self.debug)
                self.note(f"{test_set.name}: {self.splits[test_set]}")
        split = self.splits[test_set]
        return None if isinstance(split, str) else split

    def evaluate(self, run: str, test_sets: Sequence[TestSet], requested: str) -> RunResult:
        """The row of one run (not while another process writes its folder); each cell that fails is None, with
        a note."""
        result = RunResult(run_label(run), cells={s.name: None for s in test_sets})
        try:
            with folder_lock(os.path.dirname(os.path.abspath(config_path(run)))):
                loaded = load_run(run, self.request, self.device, requested)
                self._fill(result, loaded, test_sets)
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the others
            self.note(f"{result.label}: {failure_message(e, self.debug)}")
            set_training_data(result, read_training_data(run))
        return result

    def _fill(self, result: RunResult, loaded, test_sets: Sequence[TestSet]) -> None:
        cfg = loaded.cfg
        set_training_data(result, (cfg.dataset_name, cfg.annotation_file))
        result.compat = loaded.compat
        for test_set in test_sets:
            split = self.test_split(test_set, cfg)
            if split is None:
                continue
            self.logger.info("evaluating %s on %s (compat %s)", result.label, test_set.name, loaded.compat)
            try:
                metrics = evaluate_modes(loaded, [loaded.compat], build_eval_loaders(cfg, split),
                                         f"{result.label} on {test_set.name}")
                result.cells[test_set.name] = {k: float(metrics[loaded.compat][k]) for k in METRICS}
            except Exception as e:  # noqa: BLE001 - the run's other test sets still run
                self.note(f"{result.label} on {test_set.name}: {failure_message(e, self.debug)}")


def read_training_data(run: str) -> Tuple[str, str]:
    """(dataset_name, annotation_file) of a run that could not be loaded, as far as its config says."""
    try:
        raw = read_yaml(config_path(run))
    except UserError:
        return "", ""
    return str(raw.get("dataset_name") or ""), str(raw.get("annotation_file") or "")


def set_training_data(result: RunResult, data: Tuple[str, str]) -> None:
    result.dataset_name, result.annotation_file = data
    # A custom set is named by its file, as its column is.
    stem = os.path.splitext(os.path.basename(result.annotation_file))[0]
    result.trained_on = stem if result.dataset_name == "custom" and stem else result.dataset_name


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_matrix(results: Sequence[RunResult], test_sets: Sequence[TestSet], root_dir: str,
                    notes: Sequence[str]) -> str:
    """Runs x test sets, R1 with two decimals, the in-domain cell in bold; then the legend and the notes."""
    lines = ["| run | trained on | " + " | ".join(_escape(s.name) for s in test_sets) + " |",
             "|---|---|" + "---:|" * len(test_sets)]
    for result in results:
        cells = []
        for test_set in test_sets:
            metrics = result.cells[test_set.name]
            value = "" if metrics is None else f"{metrics['R1']:.2f}"
            cells.append(f"**{value}**" if value and result.in_domain(test_set) else value)
        lines.append(f"| {_escape(result.label)} | {_escape(result.trained_on)} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: text-to-image R1 (%) on each set's test split; **bold**: in-domain (the set the run was "
                  f"trained on). R5, R10, mAP and mINP: {CSV_PATH}."]
    found = [s.name for s in test_sets if not s.annotation_file]
    files = [f"{s.name} = {s.annotation_file}" for s in test_sets if s.annotation_file]
    where = [f"{', '.join(found)} under {os.path.abspath(root_dir)}"] if found else []
    lines.append("Test sets: " + "; ".join(where + files) + ".")
    batch_dependent = [r.label for r in results if r.compat not in ("", "none")]
    lines.append("Embeddings: batch-independent (compat none) for every run." if not batch_dependent else
                 "Embeddings: batch-dependent (a release's compat mode) for " + ", ".join(batch_dependent) +
                 "; batch-independent (compat none) for the others.")
    if notes:
        lines += ["", "Notes (empty cells):"] + [f"- {_escape(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_long(results: Sequence[RunResult], test_sets: Sequence[TestSet]) -> str:
    """One row per (run, test set), four decimals, empty metrics where the cell failed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        for test_set in test_sets:
            metrics = result.cells[test_set.name]
            values = [f"{metrics[k]:.4f}" for k in METRICS] if metrics else [""] * len(METRICS)
            writer.writerow([result.label, result.trained_on, test_set.name, *values,
                             str(result.in_domain(test_set)).lower()])
    return out.getvalue()


def cross_domain_matrix(request: EvaluationRequest, root_dir: str, files: Sequence[str],
                        skip_missing_images: bool = False) -> int:
    """Evaluate every run on every test set, print and write the matrix; the number of cells that failed."""
    refused = [k for k in REFUSED if k in request.overrides]
    if refused:
        raise UserError(f"--cross: --{refused[0]} does not apply; the test sets are the data sets under --root_dir "
                        f"and the annotation files of --cross_datasets")
    test_sets = find_test_sets(root_dir, files)
    runs = runs_to_evaluate(request.runs)
    evaluation = CrossEvaluation(request, root_dir, skip_missing_images, logging.getLogger("php"))
    with warnings.catch_warnings():
        # Every run evaluated in a batch-dependent mode warns, not only the first (Python shows a warning once a line).
        warnings.simplefilter("always", CompatibilityWarning)
        results = [evaluation.evaluate(run, test_sets, request.compat) for run in runs]
    matrix = markdown_matrix(results, test_sets, root_dir, evaluation.notes)
    print(matrix, end="")
    write_text(MD_PATH, matrix)
    write_text(CSV_PATH, csv_long(results, test_sets))
    failed = sum(metrics is None for r in results for metrics in r.cells.values())
    evaluation.logger.info("cross-domain matrix written to %s and %s%s", MD_PATH, CSV_PATH,
                           f"; {failed} of {len(results) * len(test_sets)} cells failed" if failed else "")
    return failed
