"""The summary table of `sh run.sh test`: one row per run and compat mode, and a mean ± std row per group of seeds.

Runs whose configs differ only in `seed`, `name` and options that change nothing of the trained model
(NOT_THE_EXPERIMENT: where it ran and was written, its worker count, logging) form a group: the number of epochs,
how often the run was evaluated (which picks best.pth) and every other option count. Two runs of one seed, or with
one checkpoint (a copy), are one sample: the later one's row says so and the group counts it once. Under its runs'
rows a group of two samples or more gets a row `<name> (n=N)`, `<name>` being the runs' name without its
`_seed<N>` suffix, with the mean and the sample standard deviation (n - 1) of each metric. summary.md shows them as `73.41 ± 0.52`; summary.csv has `n` and `<metric>_mean`,
`<metric>_std` columns, empty in the rows of single runs. Both tables carry the commit that evaluated a run,
the first 12 characters of its checkpoint's sha256, how often its test split has been evaluated (`tested`,
from its test_log.jsonl), so that a checkpoint picked by looking at the test split shows it, and the share of its
training pairs given another pair's caption (`noise`, SPEC 12; empty for clean data).
"""
from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from evaluation.metrics import METRIC_KEYS
METRICS = tuple(METRIC_KEYS)
# Options that change neither the model a run trains nor the checkpoint it picks: the run's name and folder, where
# its data and weights are read from, what computes it and how fast (num_workers, device, compile, cache,
# checkpointing of activations), logging, and the flags of one invocation.
NOT_THE_EXPERIMENT = {"seed", "name", "output_dir", "root_dir", "pretrained_dir", "num_workers", "device",
                      "tensorboard", "log_period", "torch_compile", "grad_checkpointing", "cache_images", "resume",
                      "resume_ckpt_file", "overwrite", "allow_changed_plugins"}


@dataclass
class Row:
    """One run evaluated in one compatibility mode, or the reason it could not be."""

    run: str
    dataset: str = ""
    compat: str = ""
    metrics: Optional[Dict[str, float]] = None
    note: str = ""
    commit: str = ""
    checkpoint: str = ""  # first 12 characters of the checkpoint's sha256
    tested: Optional[int] = None  # evaluations of the run's test split so far (test_log.jsonl)
    experiment: str = ""  # what runs of one group share (experiment_key); empty: grouped with no other run
    name: str = ""  # the run's `name` option
    seed: Optional[int] = None
    checkpoint_sha256: str = ""
    noise: str = ""  # the noisy-correspondence rate it trained with ("" for clean data)

    @property
    def failed(self) -> bool:
        return self.metrics is None


@dataclass
class GroupRow:
    """The mean and sample standard deviation of the runs of one group, in one compatibility mode."""

    label: str
    dataset: str
    compat: str
    n: int
    mean: Dict[str, float] = field(default_factory=dict)
    std: Dict[str, float] = field(default_factory=dict)
    commit: str = ""
    noise: str = ""


def experiment_key(config: Dict[str, object]) -> str:
    """What the runs of one group share: their resolved config without seed, name and runtime options."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True, default=str)


def base_name(name: str) -> str:
    return re.sub(r"_seed\d+$", "", name)


def with_groups(rows: Sequence[Row]) -> List[Union[Row, GroupRow]]:
    """`rows` with, after the last row of each group of two or more successful runs, the group's row; the rows of
    a group are moved together, in the order of their first row."""
    groups: Dict[tuple, List[Row]] = {}
    order: List[Union[Row, tuple]] = []
    for row in rows:
        if row.failed or not row.experiment:
            order.append(row)
            continue
        key = (row.experiment, row.compat)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(row)
    out: List[Union[Row, GroupRow]] = []
    for item in order:
        if isinstance(item, Row):
            out.append(item)
            continue
        members = groups[item]
        out.extend(members)
        samples = distinct_samples(members)
        if len(samples) > 1:
            out.append(_group_row(samples))
    return out


def distinct_samples(members: List[Row]) -> List[Row]:
    """The rows of a group that are samples of their own: a row with the seed or the checkpoint of an earlier one
    is not, and its note says so."""
    samples: List[Row] = []
    for row in members:
        same = next((s for s in samples if (row.checkpoint_sha256 and s.checkpoint_sha256 == row.checkpoint_sha256)
                     or (row.seed is not None and s.seed == row.seed)), None)
        if same is None:
            samples.append(row)
            continue
        why = "the checkpoint" if row.checkpoint_sha256 == same.checkpoint_sha256 else f"seed {row.seed}"
        note = f"same {why} as {same.run}: not a second sample of its group"
        row.note = f"{row.note}; {note}" if row.note else note
    return samples


def _group_row(members: List[Row]) -> GroupRow:
    names = {base_name(m.name) for m in members}
    label = names.pop() if len(names) == 1 else base_name(members[0].name)
    commits = {m.commit for m in members}
    return GroupRow(f"{label} (n={len(members)})", members[0].dataset, members[0].compat, len(members),
                    {k: statistics.fmean(m.metrics[k] for m in members) for k in METRICS},
                    {k: statistics.stdev(m.metrics[k] for m in members) for k in METRICS},
                    commits.pop() if len(commits) == 1 else "several", members[0].noise)


MD_COLUMNS = ("run", "dataset", "compat", *METRICS, "n", "noise", "commit", "checkpoint", "tested", "note")
CSV_COLUMNS = ("run", "dataset", "compat", *METRICS, "n", *(f"{k}_{s}" for k in METRICS for s in ("mean", "std")),
               "noise", "commit", "checkpoint", "tested", "note")


def _tested(row: Row) -> str:
    return "" if row.tested is None else str(row.tested)


def markdown_table(rows: Sequence[Union[Row, GroupRow]]) -> str:
    """GitHub-flavoured markdown: two decimals, `mean ± std` in group rows, '-' for a failed row's metrics."""
    lines = ["| " + " | ".join(MD_COLUMNS) + " |",
             "|" + "|".join("---:" if c in METRICS or c in ("n", "tested") else "---" for c in MD_COLUMNS) + "|"]
    for row in rows:
        if isinstance(row, GroupRow):
            cells = [row.label, row.dataset, row.compat,
                     *(f"{row.mean[k]:.2f} ± {row.std[k]:.2f}" for k in METRICS), str(row.n), row.noise, row.commit,
                     "", "", ""]
        else:
            values = [f"{row.metrics[k]:.2f}" for k in METRICS] if row.metrics else ["-"] * len(METRICS)
            cells = [row.run, row.dataset, row.compat, *values, "", row.noise, row.commit, row.checkpoint,
                     _tested(row), row.note]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Union[Row, GroupRow]]) -> str:
    """CSV with a header row: four decimals; a group row fills n and the _mean / _std columns, a run row the
    metrics (empty when it failed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        if isinstance(row, GroupRow):
            stats = [f"{getattr(row, s)[k]:.4f}" for k in METRICS for s in ("mean", "std")]
            writer.writerow([row.label, row.dataset, row.compat, *[""] * len(METRICS), row.n, *stats, row.noise,
                             row.commit, "", "", ""])
        else:
            values = [f"{row.metrics[k]:.4f}" for k in METRICS] if row.metrics else [""] * len(METRICS)
            writer.writerow([row.run, row.dataset, row.compat, *values, "", *[""] * (2 * len(METRICS)), row.noise,
                             row.commit, row.checkpoint, _tested(row), row.note])
    return out.getvalue()
