"""Evaluate run folders and write one summary table: `sh run.sh test [--key value ...] [RUN_DIR ...]`.

Options and run folders may come in any order; the token after an option is its value (`--root_dir X RUN`
means root_dir X and run folder RUN; `--key=value` works too; list values are written `--img_size 384,128`).
`--key value` pairs are config overrides applied to every run (e.g. `--root_dir /data/reid --test_batch_size
256 --device cpu`); `--debug` shows tracebacks, `--trust_checkpoint` allows checkpoints that need full unpickling.
With no run folder, every folder under ./logs holding configs.yaml and best.pth is evaluated (any depth).

This project's runs and published releases' folders alike (model/layouts.py). A published run whose release has a
mode of its own gives two rows: that mode (the reference protocol, e.g. PHP's `php_v1`: EFP attention across the
batch, test split in file order at the config's test_batch_size; SPEC 8) and `none` (batch-independent
embeddings). `--compat MODE` evaluates every run in that one mode instead. A run that cannot be evaluated gets a row with the reason and the others still run.
The table is printed and written to ./logs/summary.md and ./logs/summary.csv (relative to the current folder).

`--cross [--cross_datasets FILE ...]`: the cross-domain matrix instead (evaluation/cross_domain.py): every run on
the test split of every data set under --root_dir (default ./data; nothing is generated) and of each annotation
file given; written to ./logs/cross_domain.md and .csv. Embeddings are batch-independent unless --compat says
otherwise. `--cross_datasets` takes the tokens after it up to the next option, folder or .yaml file.

Exit status: 0 when every row (cell) succeeded, 1 when any failed, 2 for bad options.
"""
from __future__ import annotations

import os

from evaluation.cross_domain import cross_domain_matrix
from evaluation.runs import EvaluationRequest, check_overrides, evaluate_folders, write_summary
from model.layouts import check_compat
from utils.cli import add_shared, command, parse_command_line, run_main
from utils.config import config_from_values
from utils.logger import setup_logger


def is_annotation_token(token: str) -> bool:
    """Whether a bare token after --cross_datasets is an annotation file (not a run folder or a configs.yaml)."""
    return not os.path.isdir(token) and not token.lower().endswith((".yaml", ".yml"))


COMMAND = command("sh run.sh test", __doc__, positionals="RUN_DIR")
COMMAND.add_argument("--cross", action="store_true", help="the cross-domain matrix instead of the summary")
COMMAND.add_argument("--cross_datasets", nargs="+", action="extend", metavar="FILE",
                     ends=lambda token: not is_annotation_token(token),
                     help="annotation files to add as test sets of --cross")
add_shared(COMMAND, "compat", "trust_checkpoint", "debug", compat=None)


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    if args.cross_datasets and not args.cross:
        args.cross = True
    check_overrides(args.overrides)
    compat = check_compat(args.compat or ("none" if args.cross else "auto"))
    request = EvaluationRequest(args.positionals, args.overrides, compat, args.trust_checkpoint, args.debug)
    setup_logger()
    if args.cross:
        options = config_from_values({}, "command line", args.overrides, check=False)
        return 1 if cross_domain_matrix(request, options.root_dir, args.cross_datasets,
                                        options.skip_missing_images) else 0
    return 1 if write_summary(evaluate_folders(request)) else 0


if __name__ == "__main__":
    run_main(main)
