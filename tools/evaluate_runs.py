"""Evaluate run folders and write one summary table: `sh run.sh test [--key value ...] [RUN_DIR ...]`.

Options and run folders may come in any order; the token after an option is its value (`--root_dir X RUN`
means root_dir X and run folder RUN; `--key=value` works too; list values are written `--img_size 384,128`).
`--key value` pairs are config overrides applied to every run (e.g. `--root_dir /data/reid --test_batch_size
256 --device cpu`); `--debug` shows tracebacks, `--trust_checkpoint` allows checkpoints that need full unpickling.
With no run folder, every folder under ./logs holding configs.yaml and best.pth is evaluated (any depth).

This project's runs and published IRRA / PHP folders alike. A published PHP run gives two rows: compat `php_v1`
(the reference protocol: EFP attention across the batch, test split in file order at the config's
test_batch_size; SPEC 8) and `none` (batch-independent embeddings). `--compat none|php_v1` evaluates every run
in that one mode instead. A run that cannot be evaluated gets a row with the reason and the others still run.
The table is printed and written to ./logs/summary.md and ./logs/summary.csv (relative to the current folder).
Exit status: 0 when every row succeeded, 1 when any failed, 2 for bad options.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from datasets import dataset_from_config  # noqa: E402
from datasets.loaders import build_eval_loaders  # noqa: E402
from evaluation.embed import embed_loaders  # noqa: E402
from evaluation.metrics import retrieval_metrics  # noqa: E402
from model import load_model  # noqa: E402
from model.checkpoint_compat import COMPAT_ATTENTION, COMPAT_MODES  # noqa: E402
from model.loading import CompatibilityWarning, LoadedRun  # noqa: E402
from evaluation.search import shown_path  # noqa: E402
from evaluation.summary import METRICS, Row, csv_table, experiment_key, markdown_table, with_groups  # noqa: E402
from evaluation.eval_log import append_evaluation, count_test_evaluations  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.config import Config, apply, parse_overrides, read_yaml  # noqa: E402
from utils.env import resolve_device  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.files import write_atomic  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from utils.provenance import git_state, sha256_file  # noqa: E402
from utils.runlock import RunLock  # noqa: E402

LOGS = "logs"
FLAGS = ("--debug", "--trust_checkpoint")
# The options that decide which evaluation split a run reads (its cache key).
DATA_KEYS = ("dataset_name", "root_dir", "val_holdout_ids", "skip_missing_images", "demo_seed")


@dataclass
class Arguments:
    """The parsed command line."""

    runs: List[str] = field(default_factory=list)
    overrides: Dict[str, object] = field(default_factory=dict)
    flags: Tuple[str, ...] = ()


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Split options (each followed by at most one value token) from run folders, in any order."""
    runs: List[str] = []
    pairs: List[str] = []
    flags: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            runs.append(token)
        elif token in FLAGS:
            flags.append(token)
        elif "=" in token:
            pairs.append(token)
        else:
            pairs.append(token)
            # A token that follows an option is its value; an option directly before another (or last) is `true`.
            if i < len(argv) and not argv[i].startswith("--"):
                pairs.append(argv[i])
                i += 1
    overrides = parse_overrides(pairs)
    compat = overrides.get("compat", "auto")
    # Type-check every value once, up front: a bad override is the command's error, not every run's.
    apply(Config(), overrides, "command line")
    if compat not in COMPAT_MODES:
        raise UserError(f"command line: option 'compat' must be one of {', '.join(COMPAT_MODES)}; got {compat!r}")
    return Arguments(runs, overrides, tuple(flags))


def discover_runs(logs_dir: str = LOGS) -> List[str]:
    """Every folder under `logs_dir` (any depth) that holds both configs.yaml and best.pth, sorted."""
    found = []
    for folder, _, files in os.walk(logs_dir):
        if "configs.yaml" in files and "best.pth" in files:
            found.append(os.path.normpath(folder))
    return sorted(found)


def is_config_file(run: str) -> bool:
    return os.path.isfile(run) and run.endswith((".yaml", ".yml"))


def run_label(run: str) -> str:
    """How a run is named in the summary: its folder, relative to the current folder when inside it."""
    return shown_path(os.path.dirname(os.path.abspath(run)) if is_config_file(run) else run)


def config_path(run: str) -> str:
    """The configs.yaml of a run folder (a path to the YAML file itself is accepted too)."""
    if is_config_file(run):
        return run
    if not os.path.isdir(run):
        raise UserError(f"run folder not found: {run}")
    path = os.path.join(run, "configs.yaml")
    if not os.path.isfile(path):
        raise UserError(f"run folder {run} has no configs.yaml")
    return path


def data_config(config_file: str, overrides: Dict[str, object]) -> Config:
    """The data options of a run (its file, then the overrides), read without loading the checkpoint."""
    raw = read_yaml(config_file)
    cfg = Config()
    apply(cfg, {k: raw[k] for k in DATA_KEYS if k in raw}, config_file)
    apply(cfg, {k: overrides[k] for k in DATA_KEYS if k in overrides}, "command line")
    return cfg


class SplitCache:
    """Test splits parsed once per (data set, root, split options) and shared by every run that reads them."""

    def __init__(self) -> None:
        self._splits: Dict[tuple, object] = {}

    def get(self, cfg: Config) -> dict:
        key = tuple(os.path.abspath(cfg.root_dir) if k == "root_dir" else getattr(cfg, k) for k in DATA_KEYS)
        if key not in self._splits:
            try:
                self._splits[key] = dataset_from_config(cfg).split("test")
            except UserError as e:
                self._splits[key] = str(e)  # a missing data set is reported once per run, looked up once
        value = self._splits[key]
        if isinstance(value, str):
            raise UserError(value)
        return value


def compat_modes(run: LoadedRun, requested: str) -> List[str]:
    """The compatibility modes to evaluate a loaded run in, in row order."""
    if requested == "auto" and run.layout == "php_v1":
        return ["php_v1", "none"]
    return [run.compat]


def mode_note(compat: str, cfg: Config, metrics: dict) -> str:
    """The note of a successful row: the php_v1 protocol it followed, queries left out of the means."""
    notes = []
    if compat == "php_v1":
        notes.append(f"batch-dependent (SPEC 8): file order, test_batch_size {cfg.test_batch_size}")
    if metrics.get("num_queries_without_match"):
        notes.append(f"{metrics['num_queries_without_match']} queries without a match left out")
    return "; ".join(notes)


class ModesEncoder(torch.nn.Module):
    """A model's embeddings in several compat modes side by side ([B, modes x D]).

    One pass over the data then serves every mode, and each mode still sees exactly the batches a separate
    evaluation would (file order, test_batch_size), so php_v1 numbers are those of the reference protocol.
    """

    def __init__(self, model: torch.nn.Module, modes: Sequence[str]):
        super().__init__()
        self.model = model
        self.modes = list(modes)

    def _encode(self, encode, inputs: torch.Tensor) -> torch.Tensor:
        outputs = []
        for mode in self.modes:
            self.model.set_efp_attention(COMPAT_ATTENTION[mode])
            outputs.append(encode(inputs).float())
        return torch.cat(outputs, dim=1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(self.model.encode_image, images)

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:
        return self._encode(self.model.encode_text, caption_ids)


def evaluate_modes(model: torch.nn.Module, modes: Sequence[str], loaders: Sequence[Iterable],
                   precision: str = "fp32", desc: str = "eval") -> Dict[str, dict]:
    """t2i metrics (as `retrieval_metrics` returns them) of `model` in each compat mode, from one pass over
    `loaders` (the image loader, the text loader)."""
    feats = embed_loaders(ModesEncoder(model, modes), *loaders, precision=precision, normalize=False, desc=desc)
    device = next(model.parameters()).device
    width = feats["image_feats"].shape[1] // len(modes)
    results = {}
    for k, mode in enumerate(modes):
        columns = slice(k * width, (k + 1) * width)
        images = F.normalize(feats["image_feats"][:, columns], dim=-1).to(device)
        texts = F.normalize(feats["text_feats"][:, columns], dim=-1).to(device)
        with torch.no_grad():
            results[mode] = retrieval_metrics(texts @ images.T, feats["text_pids"], feats["image_pids"])
    return results


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def evaluate_run(run: str, args: Arguments, cache: SplitCache, device: str,
                 logger: logging.Logger) -> List[Row]:
    """The rows of one run folder; raises UserError when the run cannot be evaluated."""
    label = run_label(run)
    overrides = {k: v for k, v in args.overrides.items() if k != "compat"}
    requested = str(args.overrides.get("compat", "auto"))
    config_file = config_path(run)
    split = cache.get(data_config(config_file, overrides))  # before the checkpoint: a missing data set is cheap
    loaded = load_run(run, args, device, requested)
    cfg = loaded.cfg
    modes = compat_modes(loaded, requested)
    logger.info("evaluating %s on %s (compat %s)", label, cfg.dataset_name, " and ".join(modes))
    results = evaluate_modes(loaded.model, modes, build_eval_loaders(cfg, split), cfg.precision, label)
    experiment, checkpoint = experiment_key(cfg.to_dict()), sha256_file(loaded.checkpoint_path)
    rows = [Row(label, cfg.dataset_name, mode, {k: float(results[mode][k]) for k in METRICS},
                mode_note(mode, cfg, results[mode]), commit=code_version(), checkpoint=checkpoint[:12],
                experiment=experiment, name=cfg.name) for mode in modes]
    tested = log_evaluations(os.path.dirname(os.path.abspath(config_file)), checkpoint, rows, logger)
    for row in rows:
        row.tested = tested
    return rows


def load_run(run: str, args: Arguments, device: str, compat: str) -> LoadedRun:
    """The run folder's model, with the command line's options applied to it, in `compat` mode."""
    overrides = {k: v for k, v in args.overrides.items() if k != "compat"}
    loaded = load_model(config_path(run), device=device, compat=compat, overrides=overrides,
                        trusted="--trust_checkpoint" in args.flags)
    if "num_workers" not in overrides:
        # Published configs carry their authors' worker count (8); more workers than cores only adds start-up.
        loaded.cfg.num_workers = min(loaded.cfg.num_workers, available_cpus())
    return loaded


def runs_to_evaluate(args: Arguments) -> List[str]:
    """The run folders named on the command line, else every one found under ./logs; at least one."""
    runs = args.runs or discover_runs()
    if not runs:
        raise UserError(f"no run folders under ./{LOGS} (folders holding configs.yaml and best.pth); put one there, "
                        f"e.g. {LOGS}/ICFG-PEDES/irra_icfg/, or name run folders on the command line")
    return runs


def failure_message(error: Exception, debug: bool) -> str:
    """The one line that says why a run (or a cell) failed; with --debug the error itself, for its traceback."""
    if debug:
        raise error
    if isinstance(error, UserError):
        return str(error)
    return f"unexpected {type(error).__name__}: {(str(error).splitlines() or [''])[0]} (rerun with --debug)"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The project's commit (12 characters) that evaluates, '+dirty' when the checkout has uncommitted files."""
    commit, dirty = git_state()
    return "" if commit is None else commit[:12] + ("+dirty" if dirty else "")


def log_evaluations(run_dir: str, checkpoint_sha256: str, rows: Sequence[Row], logger: logging.Logger) -> int:
    """Append the rows' results to the run's test_log.jsonl (under its lock) and return how many evaluations of its
    test split it records. A folder that cannot be written now (read-only, or another process writing it) keeps
    its log as it is, with a warning: the evaluation itself still counts for the summary."""
    try:
        with RunLock(run_dir, "sh run.sh test"):
            for row in rows:
                append_evaluation(run_dir, kind="test", checkpoint_sha256=checkpoint_sha256, compat=row.compat,
                                  results={"t2i": row.metrics}, via="sh run.sh test", commit=row.commit)
    except UserError as e:
        logger.warning("%s: this evaluation is not recorded in its test_log.jsonl (%s)", run_dir, e)
    return count_test_evaluations(run_dir)


def failed_row(run: str, args: Arguments, message: str) -> Row:
    """A row that says why `run` was not evaluated (with its data set when the config could be read)."""
    dataset = ""
    try:
        dataset = data_config(config_path(run), args.overrides).dataset_name
    except UserError:
        pass
    return Row(run_label(run), dataset, str(args.overrides.get("compat", "auto")), None, f"error: {message}")


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a reader never sees half a summary), making its folder."""
    write_atomic(path, text, what="the summary", make_folder=True)


def evaluate_all(args: Arguments, logger: logging.Logger) -> List[Row]:
    """Rows of every run folder named (or found under ./logs), in order; a failing run becomes an error row."""
    runs = runs_to_evaluate(args)
    device = str(resolve_device(str(args.overrides.get("device", "auto"))))
    cache = SplitCache()
    rows: List[Row] = []
    for run in runs:
        try:
            rows.extend(evaluate_run(run, args, cache, device, logger))
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the others
            message = failure_message(e, "--debug" in args.flags)
            logger.error("%s: %s", run_label(run), message)
            rows.append(failed_row(run, args, message))
    return rows


def main(argv: Sequence[str]) -> int:
    """Evaluate, print and write the summary; 1 if any row failed."""
    if "--cross" in argv:
        from tools import cross_domain  # imported here: it builds on this module
        return cross_domain.main(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    args = parse_arguments(argv)
    logger = setup_logger()
    with warnings.catch_warnings():
        # Every run evaluated in php_v1 mode warns, not only the first one (Python shows a warning once per line).
        warnings.simplefilter("always", CompatibilityWarning)
        rows = evaluate_all(args, logger)
    rows = with_groups(rows)
    table = markdown_table(rows)
    print(table, end="")
    md_path, csv_path = os.path.join(LOGS, "summary.md"), os.path.join(LOGS, "summary.csv")
    write_text(md_path, table)
    write_text(csv_path, csv_table(rows))
    failed = sum(isinstance(row, Row) and row.failed for row in rows)
    logger.info("summary written to %s and %s%s", md_path, csv_path,
                f"; {failed} of {len(rows)} rows failed" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
