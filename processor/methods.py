"""The table of methods: every method's preset trained and tested under one protocol, the job of
`sh run.sh methods [--seeds 1 2 3] [--paper cuhk|icfg|rstp] [--methods IRRA,PHP] [--tag T] [--key value ...]`.

Each method (METHODS) runs its Demo preset, or with `--paper` its paper preset for that data set, through
processor.presets.run_preset: the same seeds, the same `--key value` overrides, the same test. Runs that are
already finished are only tested again, so the table can be rebuilt and extended. Then one row per method goes
to `<output_dir>/methods.md` and `methods.csv`: R1/R5/R10/mAP/mINP as mean ± std over the seeds (from each run's
test_results.json), the training seconds per epoch (the median over the run's epochs in history.json, then the
mean over seeds), the parameters, the width of each embedding and the similarity that fuses them, the precision
the runs trained in, the noisy-correspondence rate, and the wall time of the method's runs in this call.
With `--tag T` the runs are named `<name>_T` and the tables `methods_T.*`, so that a second table under other
options (`--noisy_rate 0.5`) does not find the first one's finished runs. With `--jobs N` (default `auto`: on the
CPU one per core, at most 4) N runs train side by side in worker processes, each with its share of the threads
(processor/parallel_runs.py says why that is faster on a small CPU); each run's console output then goes to
`<output_dir>/<table>_console/<run name>.txt`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from datasets import dataset_from_config
from evaluation.curves import read_history
from evaluation.metrics import METRIC_KEYS
from evaluation.runs import code_version, noise_of
from model.loading import load_model
from processor.components import check_unused_options
from processor.parallel_runs import Run, RunResult, job_count, run_side_by_side, threads_per_job
from processor.precision import cpu_description
from processor.presets import problems, run_preset, seed_runs
from utils.config import Config, build_config, read_yaml, validate
from utils.errors import UserError
from utils.files import write_atomic
from utils.provenance import utc_now

logger = logging.getLogger("php")
DATASETS = ("cuhk", "icfg", "rstp")


@dataclass(frozen=True)
class Method:
    name: str
    demo: str  # the preset (configs/<demo>.yaml) of the Demo table
    paper: str  # the paper presets' prefix: configs/<paper>_<cuhk|icfg|rstp>.yaml

    def preset(self, paper: Optional[str]) -> str:
        return f"{self.paper}_{paper}" if paper else self.demo


METHODS = (Method("IRRA", "irra_demo", "irra"), Method("PHP", "demo", "php"), Method("RDE", "rde_demo", "rde"),
           Method("TBPS-CLIP", "tbps_demo", "tbps"))


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


def select_methods(names: Optional[Sequence[str]]) -> List[Method]:
    """The methods named (case-insensitive), in the table's order; all of them when `names` is empty."""
    if not names:
        return list(METHODS)
    known = {m.name.lower(): m for m in METHODS}
    for name in names:
        if name.lower() not in known:
            raise UserError(f"command line: --methods: unknown method {name!r}; expected some of "
                            f"{', '.join(m.name for m in METHODS)}")
    wanted = {n.lower() for n in names}
    return [m for m in METHODS if m.name.lower() in wanted]


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
    md, csv_path = os.path.join(output_dir, f"{stem}.md"), os.path.join(output_dir, f"{stem}.csv")
    write_atomic(md, markdown_table(rows, header), what="the methods table", make_folder=True)
    write_atomic(csv_path, csv_table(rows), what="the methods table", make_folder=True)
    return md, csv_path


class _Table:
    """The rows of one call, written (Markdown and CSV) each time a method's runs are all done."""

    def __init__(self, configs, command: str, stem: str, jobs: int):
        self.configs, self.command, self.stem, self.jobs = configs, command, stem, jobs
        self.rows: List[Optional[MethodRow]] = [None] * len(configs)
        self.start, self.code = time.time(), 0
        self.paths: Tuple[str, str] = ("", "")
        self.output_dir, self.dataset = configs[0][2].output_dir, configs[0][2].dataset_name

    def finish(self, index: int, runs: Sequence[Config], seconds: float, code: int, note: str = "") -> None:
        method, path, _ = self.configs[index]
        preset = os.path.splitext(os.path.basename(path))[0]
        if code:
            self.code = self.code or code
            row = MethodRow(method.name, preset, wall_seconds=seconds, note=note or f"failed: exit code {code}")
        else:
            row = method_row(method, preset, runs, seconds)
        self.rows[index] = row
        self.paths = write_tables([r for r in self.rows if r], self.output_dir, self.stem, self.header())

    def header(self) -> List[str]:
        return table_header(self.command, self.dataset, time.time() - self.start, self.jobs)

    def report(self) -> int:
        print(markdown_table([r for r in self.rows if r], self.header()), flush=True)
        print(f"wrote {self.paths[0]} and {self.paths[1]}", flush=True)
        return self.code


def _one_after_another(table: _Table, runs_of: Sequence[Sequence[Config]], seeds, seed_given: bool) -> None:
    for index, ((method, path, cfg), runs) in enumerate(zip(table.configs, runs_of)):
        print(f"=== {method.name}: {os.path.splitext(os.path.basename(path))[0]}", flush=True)
        began = time.time()
        try:
            result, note = run_preset(cfg, seeds, path, seed_given), ""
        except UserError as e:  # one method's failure still leaves the others' rows
            result, note = 2, str(e)
        table.finish(index, runs, time.time() - began, result, note)


def _side_by_side(table: _Table, runs_of: Sequence[Sequence[Config]]) -> None:
    jobs, owners = [], []
    for index, ((method, path, _), runs) in enumerate(zip(table.configs, runs_of)):
        for run in runs:
            console = os.path.join(run.output_dir, f"{table.stem}_console", f"{run.name}.txt")
            jobs.append(Run(f"{method.name} {run.name}", run.to_dict(), path, console))
            owners.append(index)
    left, seconds = [len(runs) for runs in runs_of], [0.0] * len(runs_of)
    failed: List[Optional[RunResult]] = [None] * len(runs_of)

    def done(job: int, result: RunResult) -> None:
        index = owners[job]
        left[index] -= 1
        seconds[index] += result.seconds
        state = "done" if not result.code else f"FAILED (exit code {result.code}): {result.error}"
        print(f"=== {result.label}: {state} in {result.seconds / 60:.1f} min; console: {jobs[job].console}",
              flush=True)
        if result.code and failed[index] is None:
            failed[index] = result
        if not left[index]:
            bad = failed[index]
            table.finish(index, runs_of[index], seconds[index], bad.code if bad else 0, bad.error if bad else "")

    print(f"=== {len(jobs)} runs, {table.jobs} side by side ({threads_per_job(table.jobs)} thread(s) each)", flush=True)
    run_side_by_side(jobs, table.jobs, done)


def run_methods(config_dir: str, seeds: Optional[Sequence[int]] = None, overrides: Optional[Dict] = None,
                paper: Optional[str] = None, methods: Optional[Sequence[str]] = None, seed_given: bool = False,
                command: str = "sh run.sh methods", tag: str = "", jobs: str = "auto") -> int:
    """Train and test every chosen method's preset, then write its row; the first non-zero exit code of a
    method (the others still run), else 0. The tables are rewritten as each method's runs are done. With more
    than one job (`jobs`, see processor.parallel_runs.job_count) the runs go side by side in worker processes."""
    configs = method_configs(config_dir, select_methods(methods), paper, overrides or {}, tag)
    runs_of = [seed_runs(cfg, seeds, seed_given) for _, _, cfg in configs]  # a bad --seeds fails here
    count = job_count(jobs, sum(map(len, runs_of)), configs[0][2].device)
    stem = "_".join(["methods", *([paper] if paper else []), *([tag] if tag else [])])
    table = _Table(configs, command, stem, count)
    if count == 1:
        _one_after_another(table, runs_of, seeds, seed_given)
    else:
        # A generated Demo-PEDES is made here once, not by two workers at once; each set is read once.
        for cfg in {(c.dataset_name, c.root_dir, c.demo_seed): c for _, _, c in configs}.values():
            dataset_from_config(cfg, generate=True)
        _side_by_side(table, runs_of)
    return table.report()
