"""Evaluate a run folder: `python test.py --config_file RUN/configs.yaml [--checkpoint P] [--compat none]`.

Works on this project's runs and on published IRRA / PHP run folders. Prints the metrics table and writes
`test_results.json` beside the config, with the result's provenance (commit, file hashes, versions, date).
`--audit` checks whether embeddings depend on their batch (exit 3 if so). Every evaluation of the test split is
also appended to `test_log.jsonl` in the run folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Optional, Sequence, Tuple

from datasets import dataset_from_config
from datasets.loaders import build_eval_loaders
from evaluation.evaluator import Evaluator
from evaluation.eval_log import append_evaluation
from evaluation.metrics import METRIC_KEYS
from model import load_model
from model.loading import LoadedRun
from utils.cli import run_main, split_argv
from utils.env import resolve_device
from utils.files import write_atomic
from utils.logger import setup_logger
from utils.provenance import evaluation_provenance
from utils.runlock import RunLock


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                epilog="Config options can follow as --key value, e.g. --root_dir /data "
                                       "--test_batch_size 256 --compat none|php_v1|auto.")
    p.add_argument("--config_file", required=True, help="the run's configs.yaml")
    p.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: best.pth beside the config)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate")
    p.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    p.add_argument("--audit", action="store_true", help="check that embeddings do not depend on the batch")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return p


def write_results(path: str, updates: dict, keep: Optional[Sequence[str]] = None) -> None:
    """Write `updates` into the JSON file at `path`, keeping of its previous content the keys in `keep` (all by
    default): an audit and a plain test share the file, but the `i2t` of an earlier test must not sit beside the
    provenance of a later one."""
    results = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError):
            results = {}
    if not isinstance(results, dict):
        results = {}
    if keep is not None:
        results = {k: v for k, v in results.items() if k in keep}
    results.update(updates)
    write_atomic(path, json.dumps(results, indent=2), what="test results")


def load_split(cfg, split_name: str) -> Tuple[dict, Optional[str]]:
    """The split to evaluate and the annotation file it came from (None when it came from no file)."""
    dataset = dataset_from_config(cfg)
    return dataset.split(split_name), dataset.annotation_file


def main(argv) -> int:
    args, overrides = split_argv(parser(), argv)
    logger = setup_logger()
    compat = overrides.pop("compat", "auto")
    device = resolve_device(overrides.get("device", "auto"))
    run = load_model(args.config_file, args.checkpoint, device=str(device), compat=compat, overrides=overrides,
                     trusted=args.trust_checkpoint)
    split, annotation_file = load_split(run.cfg, args.split)
    run_dir = os.path.dirname(os.path.abspath(args.config_file))
    logger.info("evaluating %s on %s/%s (compat %s)", run.checkpoint_path, run.cfg.dataset_name, args.split,
                run.compat)
    # test_results.json, test_log.jsonl and experts.png go into the run folder: not while another process writes it.
    with RunLock(run_dir, "test.py"):
        return evaluate(run, split, args, run_dir, annotation_file)


def provenance_of(run: LoadedRun, args, annotation_file: Optional[str], precision: str, started: float) -> dict:
    return evaluation_provenance(checkpoint=run.checkpoint_path, config=args.config_file,
                                 annotation_file=annotation_file, device=next(run.model.parameters()).device,
                                 precision=precision, seconds=time.monotonic() - started)


def log_test_look(run_dir: str, args, kind: str, run: LoadedRun, results: dict, provenance: dict, **extra) -> None:
    """Record an evaluation of the test split in the run's test log (one of the val split is no look at it)."""
    if args.split == "test":
        append_evaluation(run_dir, kind=kind, checkpoint_sha256=provenance["checkpoint_sha256"], compat=run.compat,
                          results=results, checkpoint=os.path.abspath(run.checkpoint_path),
                          dataset=run.cfg.dataset_name, provenance=provenance, **extra)


def evaluate(run: LoadedRun, split: dict, args, run_dir: str, annotation_file: Optional[str] = None) -> int:
    """Evaluate (or audit) the run's model on `split`, print the table, log a look at the test split and write
    test_results.json; the exit code."""
    model, cfg = run.model, run.cfg
    results_path = os.path.join(run_dir, "test_results.json")
    started = time.monotonic()
    if args.audit:
        from evaluation.audit import run_audit
        audit = run_audit(model, cfg, split)
        # The audit embeds in fp32 whatever the run's precision says (evaluation/audit.py).
        audit["provenance"] = provenance_of(run, args, annotation_file, "fp32", started)
        log_test_look(run_dir, args, "audit", run, audit["modes"], audit["provenance"],
                      batch_independent=audit["batch_independent"])
        write_results(results_path, {"audit": audit})
        return 0 if audit["batch_independent"] else 3

    evaluator = Evaluator(*build_eval_loaders(cfg, split), precision=cfg.precision)
    results, table = evaluator.evaluate(model, i2t=args.i2t)
    print(table)
    record = {"t2i": {k: results["t2i"][k] for k in METRIC_KEYS},
              "checkpoint": os.path.abspath(run.checkpoint_path), "dataset": cfg.dataset_name,
              "split": args.split, "compat": run.compat, "num_queries": results["num_queries"],
              "num_gallery": results["num_gallery"]}
    if args.i2t:
        record["i2t"] = {k: results["i2t"][k] for k in METRIC_KEYS}
    record["provenance"] = provenance_of(run, args, annotation_file, cfg.precision, started)
    log_test_look(run_dir, args, "test", run, {k: record[k] for k in ("t2i", "i2t") if k in record},
                  record["provenance"])
    usage = model.expert_usage()
    if usage:
        from evaluation.expert_report import report_expert_usage
        record["expert_usage"] = report_expert_usage(usage, run_dir)
    write_results(results_path, record, keep=("audit",))
    logging.getLogger("php").info("results written to %s", results_path)
    return 0


if __name__ == "__main__":
    run_main(main)
