"""The table of methods: every method's preset trained and tested under one protocol, the job of
`sh run.sh methods [--seeds 1 2 3] [--paper cuhk|icfg|rstp] [--methods IRRA,PHP] [--tag T] [--key value ...]`.

Each registered method (processor/method_presets.py) runs its Demo preset, or with `--paper` its paper preset for that data set, one run per seed
through processor.presets.train_and_test: the same seeds, the same `--key value` overrides, the same test. Runs
that are already finished are only tested again, so the table can be rebuilt and extended. A run whose folder
another process holds (a second `sh run.sh methods` at once) is tried again after the others, waiting for that
process, so both commands' tables hold it. Then one row per method goes to `<output_dir>/methods.md` and
`methods.csv` (written by processor/methods_table.py, which keeps the rows of other methods that a command
running at the same time wrote to the same table): R1/R5/R10/mAP/mINP as mean ± std over the seeds (from each run's
test_results.json), the training seconds per epoch (the median over the run's epochs in history.json, then the
mean over seeds), the parameters, the width of each embedding and the similarity that fuses them, the precision
the runs trained in, the noisy-correspondence rate, and the wall time of the method's runs in this call.
With `--tag T` the runs are named `<name>_T` and the tables `methods_T.*`, so that a second table under other
options (`--noisy_rate 0.5`) does not find the first one's finished runs. With `--jobs N` (default `auto`: on the
CPU one per core, at most 4) N runs train side by side in worker processes, each with its share of the threads
(processor/parallel_runs.py says why that is faster on a small CPU); each run's console output then goes to
`<output_dir>/<table>_console/<run name>.txt`. Ctrl-C stops every run and writes the rows done so far.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

from datasets import dataset_from_config
from evaluation.curves import read_history
from evaluation.metrics import METRIC_KEYS
from evaluation.runs import noise_of
from model.loading import load_model
from processor.components import check_unused_options
from processor.methods_table import (MethodRow, markdown_table, rows_of_others, table_clock, table_header, table_lock,
                                     table_paths, write_tables)
from processor.parallel_runs import Run, RunResult, job_count, run_here, run_side_by_side, threads_per_job
from processor.method_presets import Method, table_methods
from processor.presets import problems, seed_runs
from utils.config import Config, build_config, read_yaml, validate
from utils.errors import UserError

logger = logging.getLogger("php")
DATASETS = ("cuhk", "icfg", "rstp")


def select_methods(names: Optional[Sequence[str]]) -> List[Method]:
    """The methods named (case-insensitive), in the table's order; all of them when `names` is None. An empty
    list (`--methods ,`) is refused: it names nothing, which is not "all"."""
    methods = table_methods()
    if names is None:
        return methods
    if not names:
        raise UserError(f"command line: --methods names no method; expected a comma-separated subset of "
                        f"{', '.join(m.name for m in methods)}")
    known = {m.name.lower(): m for m in methods}
    for name in names:
        if name.lower() not in known:
            raise UserError(f"command line: --methods: unknown method {name!r}; expected some of "
                            f"{', '.join(m.name for m in methods)}")
    wanted = {n.lower() for n in names}
    return [m for m in methods if m.name.lower() in wanted]


def method_configs(config_dir: str, methods: Sequence[Method], paper: Optional[str],
                   overrides: Dict[str, object], tag: str = "") -> List[Tuple[Method, str, Config]]:
    """(method, preset file, config) of each method, every preset read and checked before anything trains; with
    `tag`, each run is named `<preset's name>_<tag>`."""
    if paper is not None and paper not in DATASETS:
        raise UserError(f"command line: --paper {paper!r}: expected one of {', '.join(DATASETS)}")
    if "name" in overrides:
        # One name for all methods would put their runs in one folder, where a finished run is only tested again.
        raise UserError("command line: --name does not apply to the methods table (each method keeps its preset's "
                        "name); give --tag TAG to name a new set of runs <name>_<TAG>")
    found = []
    for method in methods:
        path = os.path.join(config_dir, f"{method.preset(paper)}.yaml")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such preset for method {method.name}")
        cfg = build_config(path, dict(overrides))
        check_unused_options(cfg)  # an option of another method's head or loss fails here, before any training
        if tag:
            cfg = validate(cfg.copy(name=f"{cfg.name}_{tag}"), "command line: --tag")
        found.append((method, path, cfg))
    missing: Dict[str, List[str]] = {}  # what is missing -> the methods that miss it, each line said once
    for method, _, cfg in found:
        for line in problems(cfg):
            missing.setdefault(line, []).append(method.name)
    if missing:
        raise UserError("; ".join(f"missing ({', '.join(names)}): {line}" for line, names in missing.items()))
    return found


def _median_epoch_seconds(run_dir: str) -> Tuple[Optional[float], int]:
    seconds = [float(r["seconds"]) for r in read_history(run_dir) if "seconds" in r]
    return (statistics.median(seconds) if seconds else None), len(seconds)


def _test_metrics(run_dir: str) -> Dict[str, float]:
    path = os.path.join(run_dir, "test_results.json")
    try:
        with open(path, encoding="utf-8") as f:
            t2i = json.load(f)["t2i"]
        return {k: float(t2i[k]) for k in METRIC_KEYS}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: no test metrics ({type(e).__name__}: {e}); test the run with test.py") from None


def _model_facts(run_dir: str) -> Tuple[float, str]:
    """(parameters in millions, the embeddings' widths and their declared similarity) of a trained run."""
    model = load_model(os.path.join(run_dir, "configs.yaml")).model
    widths = model.embedding_widths
    names = model.similarity.names
    embedding = " + ".join(f"{name} {widths[name]}" for name in names)
    if len(names) > 1:
        embedding += f" ({model.similarity.describe()})"
    return sum(p.numel() for p in model.parameters()) / 1e6, embedding


def method_row(method: Method, preset: str, runs: Sequence[Config], wall_seconds: float) -> MethodRow:
    """The table's row of one method from the files of its runs (one per seed)."""
    row = MethodRow(method.name, preset, len(runs), wall_seconds=wall_seconds, noise=noise_of(runs[0]))
    metrics = [_test_metrics(run.run_dir) for run in runs]
    for key in METRIC_KEYS:
        values = [m[key] for m in metrics]
        row.mean[key] = statistics.fmean(values)
        row.std[key] = statistics.stdev(values) if len(values) > 1 else None
    timed = [_median_epoch_seconds(run.run_dir) for run in runs]
    seconds = [s for s, _ in timed if s is not None]
    row.epoch_seconds = statistics.fmean(seconds) if seconds else None
    row.epochs = max(n for _, n in timed)
    row.params_m, row.embedding = _model_facts(runs[0].run_dir)
    precisions = sorted({_recorded_precision(run.run_dir) for run in runs})
    row.precision = "/".join(precisions)
    return row


def _recorded_precision(run_dir: str) -> str:
    """The precision a run trained in, as its configs.yaml records it (`auto` is resolved there)."""
    return str(read_yaml(os.path.join(run_dir, "configs.yaml")).get("precision", ""))


class _Table:
    """The rows of one call, written (Markdown and CSV) each time a method's runs are all done."""

    def __init__(self, configs, runs_of: Sequence[Sequence[Config]], command: str, stem: str, jobs: int):
        self.configs, self.runs_of, self.command, self.stem, self.jobs = configs, runs_of, command, stem, jobs
        self.rows: List[Optional[MethodRow]] = [None] * len(configs)
        self.left = [len(runs) for runs in runs_of]  # runs of each method still to end
        self.seconds = [0.0] * len(configs)
        self.failed: List[Optional[RunResult]] = [None] * len(configs)
        self.start, self.code, self.text = time.time(), 0, ""
        self.paths: Tuple[str, str] = ("", "")
        self.output_dir, self.dataset = configs[0][2].output_dir, configs[0][2].dataset_name
        self.since = table_clock(self.output_dir, stem)

    def preset(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.configs[index][1]))[0]

    def done(self, index: int, result: RunResult, console: str = "") -> None:
        """One run of method `index` has ended; the method's row is written once all of its runs have."""
        self.left[index] -= 1
        self.seconds[index] += result.seconds
        state = "done" if not result.code else f"FAILED (exit code {result.code}): {result.error}"
        print(f"=== {result.label}: {state} in {result.seconds / 60:.1f} min" + (f"; console: {console}" if console
                                                                                 else ""), flush=True)
        if result.code and self.failed[index] is None:
            self.failed[index] = result
        if not self.left[index]:
            bad = self.failed[index]
            self.finish(index, bad.code if bad else 0, bad.error if bad else "")

    def finish(self, index: int, code: int, note: str = "") -> None:
        method = self.configs[index][0]
        if code:
            self.code = self.code or code
            # The run's exit code as train.py / test.py exit with it (4: a non-finite loss), then their error line.
            row = MethodRow(method.name, self.preset(index), wall_seconds=self.seconds[index],
                            note=f"exit code {code}: {note}" if note else f"failed: exit code {code}")
        else:
            row = method_row(method, self.preset(index), self.runs_of[index], self.seconds[index])
        self.rows[index] = row
        self.write()

    def interrupted(self) -> None:
        """After Ctrl-C: the rows of the methods done so far, and one per other method saying how far it got. A
        call that finished none leaves an earlier table as it was."""
        if not any(self.rows):
            return
        for index, row in enumerate(self.rows):
            if row is None:
                total = len(self.runs_of[index])
                self.rows[index] = MethodRow(self.configs[index][0].name, self.preset(index),
                                             wall_seconds=self.seconds[index],
                                             note=f"interrupted: {total - self.left[index]} of {total} runs ended")
        self.write()
        print(f"wrote {self.paths[0]} and {self.paths[1]}", flush=True)

    def write(self) -> None:
        ours = [r for r in self.rows if r]
        with table_lock(self.output_dir, self.stem):
            others = rows_of_others(table_paths(self.output_dir, self.stem)[1], self.since,
                                    [method.name for method, _, _ in self.configs])
            order = {m.name: i for i, m in enumerate(table_methods())}
            rows = sorted(ours + others, key=lambda r: order.get(r.method, len(order)))
            header = self.header() + ([f"Rows of {', '.join(r.method for r in others)}: from another `sh run.sh "
                                       f"methods` that wrote this table while this one ran."] if others else [])
            self.paths = write_tables(rows, self.output_dir, self.stem, header)
            self.text = markdown_table(rows, header)

    def header(self) -> List[str]:
        return table_header(self.command, self.dataset, time.time() - self.start, self.jobs)

    def report(self) -> int:
        print(self.text, flush=True)
        print(f"wrote {self.paths[0]} and {self.paths[1]}", flush=True)
        return self.code


def _one_after_another(table: _Table) -> None:
    """Each run in this process, in the table's order; a run whose folder another process holds is tried again
    after all the others, waiting for that process."""
    busy = []
    for index, (method, path, cfg) in enumerate(table.configs):
        print(f"=== {method.name}: {table.preset(index)}", flush=True)
        for run in table.runs_of[index]:
            if run is not cfg:  # one run per seed
                print(f"== seed {run.seed}: run {run.name}", flush=True)
            result = run_here(run, path, f"{method.name} {run.name}", wait=False)
            if result.busy:
                print(f"=== {result.label}: {result.error}; trying again after the other runs", flush=True)
                busy.append((index, run))
            else:
                table.done(index, result)
    for index, run in busy:
        method, path, _ = table.configs[index]
        table.done(index, run_here(run, path, f"{method.name} {run.name}", wait=True))


def _side_by_side(table: _Table) -> None:
    jobs, owners = [], []
    for index, (method, path, _) in enumerate(table.configs):
        for run in table.runs_of[index]:
            console = os.path.join(run.output_dir, f"{table.stem}_console", f"{run.name}.txt")
            jobs.append(Run(f"{method.name} {run.name}", run.to_dict(), path, console))
            owners.append(index)
    print(f"=== {len(jobs)} runs, {table.jobs} side by side ({threads_per_job(table.jobs)} thread(s) each)", flush=True)
    run_side_by_side(jobs, table.jobs, lambda job, result: table.done(owners[job], result, jobs[job].console))


def run_methods(config_dir: str, seeds: Optional[Sequence[int]] = None, overrides: Optional[Dict] = None,
                paper: Optional[str] = None, methods: Optional[Sequence[str]] = None, seed_given: bool = False,
                command: str = "sh run.sh methods", tag: str = "", jobs: str = "auto") -> int:
    """Train and test every chosen method's preset, then write its row; the first non-zero exit code of a
    method (the others still run), else 0. The tables are rewritten as each method's runs are done. With more
    than one job (`jobs`, see processor.parallel_runs.job_count) the runs go side by side in worker processes.
    Ctrl-C (KeyboardInterrupt, re-raised) stops them all and writes the rows done so far."""
    configs = method_configs(config_dir, select_methods(methods), paper, overrides or {}, tag)
    runs_of = [seed_runs(cfg, seeds, seed_given) for _, _, cfg in configs]  # a bad --seeds fails here
    count = job_count(jobs, sum(map(len, runs_of)), configs[0][2].device)
    stem = "_".join(["methods", *([paper] if paper else []), *([tag] if tag else [])])
    table = _Table(configs, runs_of, command, stem, count)
    try:
        if count == 1:
            _one_after_another(table)
        else:
            # A generated Demo-PEDES is made here once, not by two workers at once; each set is read once.
            for cfg in {(c.dataset_name, c.root_dir, c.demo_seed): c for _, _, c in configs}.values():
                dataset_from_config(cfg, generate=True)
            _side_by_side(table)
    except KeyboardInterrupt:
        table.interrupted()
        raise
    return table.report()
