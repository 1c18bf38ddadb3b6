"""`test_run`: evaluate a run folder's checkpoint on a split, what `python test.py` and `sh run.sh <preset>` run.

Works on this project's runs and on published IRRA / PHP run folders. Prints the metrics table and writes
`test_results.json` beside the config, with the result's provenance (commit, file hashes, versions, date); with
`audit`, checks whether embeddings depend on their batch instead. Every evaluation of the test split is also
appended to `test_log.jsonl` in the run folder.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from datasets import dataset_from_config
from datasets.loaders import build_eval_loaders
from evaluation.audit import run_audit
from evaluation.eval_log import append_evaluation
from evaluation.evaluator import Evaluator
from evaluation.metrics import METRIC_KEYS
from model import load_model
from model.layouts import PROJECT
from model.loading import LoadedRun, read_state_dict
from utils.env import resolve_device
from utils.files import write_atomic
from utils.provenance import evaluation_provenance, sha256_file
from utils.runlock import RunLock

logger = logging.getLogger("php")
# Exit status of an audit that found batch-dependent embeddings.
BATCH_DEPENDENT = 3


@dataclass(frozen=True)
class TestRequest:
    """What to evaluate: the run's configs.yaml, and how."""

    config_file: str
    checkpoint: Optional[str] = None  # default: best.pth beside the config
    split: str = "test"
    i2t: bool = False
    audit: bool = False
    compat: str = "auto"
    overrides: Optional[Dict[str, Any]] = None  # config options applied to the run's own
    trusted: bool = False  # allow checkpoints that need full unpickling


def test_run(request: TestRequest) -> int:
    """Evaluate (or audit) the run; returns 0, or BATCH_DEPENDENT for an audit that found batch dependence."""
    overrides = dict(request.overrides or {})
    device = resolve_device(overrides.get("device", "auto"))
    run = load_model(request.config_file, request.checkpoint, device=str(device), compat=request.compat,
                     overrides=overrides, trusted=request.trusted)
    dataset = dataset_from_config(run.cfg)
    split = dataset.split(request.split)
    for change in run_changes(run, dataset.annotation_file)[len(run.changes):]:
        logger.warning("%s: %s: its results may differ from the trained run's", request.config_file, change)
    run_dir = os.path.dirname(os.path.abspath(request.config_file))
    logger.info("evaluating %s on %s/%s (compat %s)", run.checkpoint_path, run.cfg.dataset_name, request.split,
                run.compat)
    # test_results.json, test_log.jsonl and experts.png go into the run folder: not while another process writes it.
    with RunLock(run_dir, "test.py"):
        if request.audit:
            return _audit(run, split, request, run_dir, dataset.annotation_file)
        return _evaluate(run, split, request, run_dir, dataset.annotation_file)


def test_trained(cfg, model: torch.nn.Module, dataset, run_dir: str) -> int:
    """Test a run just trained in this process, as test_run would test its folder, without building its config,
    data set and model again: `model` (the trained one) takes the weights of the run's best.pth, and the test split
    is `dataset`'s, the one it trained on. Returns 0."""
    path = os.path.join(run_dir, "best.pth")
    state, trained_with, verified = read_state_dict(path)
    verified.result()
    model.load_state_dict(state)
    run = LoadedRun(model.eval(), cfg, PROJECT, model.mode, path, trained_with)
    request = TestRequest(os.path.join(run_dir, "configs.yaml"))
    logger.info("evaluating %s on %s/test (compat %s)", path, cfg.dataset_name, run.compat)
    with RunLock(run_dir, "test.py"):
        return _evaluate(run, dataset.split("test"), request, run_dir, dataset.annotation_file)


def run_changes(run: LoadedRun, annotation_file: Optional[str]) -> List[str]:
    """What differs from what the run trained with, one phrase each: its plug-in files (load_model found them) and
    its annotation file, by the sha256 its checkpoint records."""
    changes = list(run.changes)
    recorded = run.trained_with.get("annotations_sha256")
    if recorded and annotation_file:
        now = sha256_file(annotation_file)
        if now != recorded:
            changes.append(f"annotation file {annotation_file} changed since training (sha256 {recorded[:12]} -> "
                           f"{now[:12]})")
    return changes


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


def _provenance(run: LoadedRun, request: TestRequest, annotation_file: Optional[str], precision: str,
                started: float) -> dict:
    return evaluation_provenance(checkpoint=run.checkpoint_path, config=request.config_file,
                                 annotation_file=annotation_file, device=next(run.model.parameters()).device,
                                 precision=precision, seconds=time.monotonic() - started,
                                 plugins=run.cfg.custom_imports)


def _log_look(run_dir: str, request: TestRequest, kind: str, run: LoadedRun, results: dict, provenance: dict,
              **extra) -> None:
    """Record an evaluation of the test split in the run's test log (one of the val split is no look at it)."""
    if request.split == "test":
        append_evaluation(run_dir, kind=kind, checkpoint_sha256=provenance["checkpoint_sha256"], compat=run.compat,
                          results=results, checkpoint=os.path.abspath(run.checkpoint_path),
                          dataset=run.cfg.dataset_name, provenance=provenance, **extra)


def _audit(run: LoadedRun, split: dict, request: TestRequest, run_dir: str, annotation_file: Optional[str]) -> int:
    started = time.monotonic()
    audit = run_audit(run.model, run.cfg, split)
    # The audit embeds in fp32 whatever the run's precision says (evaluation/audit.py).
    audit["provenance"] = _provenance(run, request, annotation_file, "fp32", started)
    _log_look(run_dir, request, "audit", run, audit["modes"], audit["provenance"],
              batch_independent=audit["batch_independent"])
    write_results(os.path.join(run_dir, "test_results.json"), {"audit": audit})
    return 0 if audit["batch_independent"] else BATCH_DEPENDENT


def _evaluate(run: LoadedRun, split: dict, request: TestRequest, run_dir: str,
              annotation_file: Optional[str]) -> int:
    model, cfg = run.model, run.cfg
    started = time.monotonic()
    evaluator = Evaluator(*build_eval_loaders(cfg, split), precision=cfg.precision)
    results, table = evaluator.evaluate(model, i2t=request.i2t)
    print(table)
    record = {"t2i": {k: results["t2i"][k] for k in METRIC_KEYS},
              "checkpoint": os.path.abspath(run.checkpoint_path), "dataset": cfg.dataset_name,
              "split": request.split, "compat": run.compat, "num_queries": results["num_queries"],
              "num_gallery": results["num_gallery"]}
    if request.i2t:
        record["i2t"] = {k: results["i2t"][k] for k in METRIC_KEYS}
    record["provenance"] = _provenance(run, request, annotation_file, cfg.precision, started)
    _log_look(run_dir, request, "test", run, {k: record[k] for k in ("t2i", "i2t") if k in record},
              record["provenance"])
    record.update(model.reports(run_dir))  # what the heads measured over the test split (model/head.py)
    results_path = os.path.join(run_dir, "test_results.json")
    write_results(results_path, record, keep=("audit",))
    logger.info("results written to %s", results_path)
    return 0
