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
options (`--noisy_rate 0.5`) does not find the first one's finished runs.
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

from evaluation.curves import read_history
from evaluation.metrics import METRIC_KEYS
from evaluation.runs import code_version, noise_of
from model.loading import load_model
from processor.components import check_unused_options
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


def table_header(command: str, dataset: str, seconds: float) -> List[str]:
    """Where and how the table was made: the command, the data set, the CPU, torch, the commit, the date."""
    cpu = cpu_description()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in (cpu.get("flags") or {}).items())
    return [f"# Methods on {dataset}", "",
            f"`{command}`, {utc_now()}, commit {code_version() or 'unknown'}: {seconds / 60:.1f} minutes in all.",
            f"Machine: {cpu.get('model') or 'unknown CPU'} ({flags or 'flags unknown'}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
            "Metrics: the test split, text to image, mean ± sample std over the seeds; s/epoch: the median epoch of "
            "each run, averaged over seeds; minutes: this command's time for the method (training and testing)."]


def write_tables(rows: Sequence[MethodRow], output_dir: str, stem: str, header: Sequence[str]) -> Tuple[str, str]:
    md, csv_path = os.path.join(output_dir, f"{stem}.md"), os.path.join(output_dir, f"{stem}.csv")
    write_atomic(md, markdown_table(rows, header), what="the methods table", make_folder=True)
    write_atomic(csv_path, csv_table(rows), what="the methods table", make_folder=True)
    return md, csv_path


def run_methods(config_dir: str, seeds: Optional[Sequence[int]] = None, overrides: Optional[Dict] = None,
                paper: Optional[str] = None, methods: Optional[Sequence[str]] = None, seed_given: bool = False,
                command: str = "sh run.sh methods", tag: str = "") -> int:
    """Train and test every chosen method's preset in turn, then write its row; the first non-zero exit code
    of a method (the others still run), else 0. The tables are rewritten after each method."""
    configs = method_configs(config_dir, select_methods(methods), paper, overrides or {}, tag)
    runs_of = [seed_runs(cfg, seeds, seed_given) for _, _, cfg in configs]  # a bad --seeds fails here
    start, rows, code = time.time(), [], 0
    stem = "_".join(["methods", *([paper] if paper else []), *([tag] if tag else [])])
    output_dir, dataset = configs[0][2].output_dir, configs[0][2].dataset_name
    for (method, path, cfg), runs in zip(configs, runs_of):
        preset = os.path.splitext(os.path.basename(path))[0]
        print(f"=== {method.name}: {preset}", flush=True)
        began = time.time()
        try:
            result, note = run_preset(cfg, seeds, path, seed_given), ""
        except UserError as e:  # one method's failure still leaves the others' rows
            result, note = 2, str(e)
        if result:
            code = code or result
            rows.append(MethodRow(method.name, preset, wall_seconds=time.time() - began,
                                  note=note or f"failed: exit code {result}"))
        else:
            rows.append(method_row(method, preset, runs, time.time() - began))
        header = table_header(command, dataset, time.time() - start)
        md, csv_path = write_tables(rows, output_dir, stem, header)
    print(markdown_table(rows, header), flush=True)
    print(f"wrote {md} and {csv_path}", flush=True)
    return code
