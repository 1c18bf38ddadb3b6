"""Batch-independence audit: embed a split in three batchings and compare embeddings and metrics (SPEC 8).

Orders: `file` (the configured batch size, in file order: for the benchmarks' test lists that is identity
order), `shuffled` (the same batch size, a seeded random order) and `single` (one sample per batch). If every
embedding is the same in all three (largest change below 1e-4 of its norm), the model's numbers cannot depend on
how the test set is batched. Embedding runs in fp32 with autocast off, so rounding is not mistaken for batch
dependence.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import torch
from prettytable import PrettyTable

from datasets.loaders import build_eval_loaders
from evaluation.embed import embed_loaders
from evaluation.metrics import METRIC_KEYS
from evaluation.scoring import feature_metrics

logger = logging.getLogger("php")

ORDERS = ("file", "shuffled", "single")
TOLERANCE = 1e-4


def embed_split(model, cfg, split: dict, order: str = "file", batch_size: Optional[int] = None,
                seed: int = 0) -> Dict[str, torch.Tensor]:
    """Raw (unnormalised) image and text embeddings of `split` (`*_feats`: every named embedding side by side) and
    their retrieval features (`*_features`), returned in the split's own order."""
    batch_size = 1 if order == "single" else (batch_size or cfg.test_batch_size)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) if order == "shuffled" else torch.arange(n)
             for n in (len(split["img_paths"]), len(split["captions"]))]
    loaders = build_eval_loaders(cfg, split, batch_size, orders=(perms[0].tolist(), perms[1].tolist()))
    feats = embed_loaders(model, *loaders, precision="fp32", keep_raw=True, desc=f"audit ({order})")
    out = {}
    for name, perm in (("image", perms[0]), ("text", perms[1])):
        feats[f"{name}_features"] = feats.pop(f"{name}_feats")
        feats[f"{name}_feats"] = feats.pop(f"{name}_raw")
        for kind in ("feats", "features", "pids"):
            value = feats[f"{name}_{kind}"]
            restored = torch.empty_like(value)
            restored[perm] = value
            out[f"{name}_{kind}"] = restored
    return out


def metrics_of(feats: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return feature_metrics(feats["text_features"], feats["image_features"], feats["text_pids"],
                           feats["image_pids"])["t2i"]


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ||a_i - b_i|| / ||b_i|| over rows."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-12)).max())


def audit(model, cfg, split: dict, orders: Sequence[str] = ORDERS, batch_size: Optional[int] = None,
          seed: int = 0) -> dict:
    """Metrics under each order and the largest embedding change against one-sample batches."""
    embedded = {order: embed_split(model, cfg, split, order, batch_size, seed) for order in orders}
    reference = embedded["single"] if "single" in embedded else embedded[orders[0]]
    modes = {}
    for order, feats in embedded.items():
        change = max(relative_change(feats["image_feats"], reference["image_feats"]),
                     relative_change(feats["text_feats"], reference["text_feats"]))
        metrics = metrics_of(feats)
        modes[order] = {**{k: metrics[k] for k in METRIC_KEYS}, "max_change": change}
    max_change = max(m["max_change"] for m in modes.values())
    return {"modes": modes, "max_change": max_change, "batch_independent": max_change < TOLERANCE,
            "batch_size": batch_size or cfg.test_batch_size, "tolerance": TOLERANCE,
            "num_queries": len(split["captions"]), "num_gallery": len(split["img_paths"])}


def audit_table(result: dict) -> PrettyTable:
    table = PrettyTable(["order", "batch"] + list(METRIC_KEYS) + ["max change"])
    for order, m in result["modes"].items():
        batch = 1 if order == "single" else result["batch_size"]
        table.add_row([order, batch] + [f"{m[k]:.2f}" for k in METRIC_KEYS] + [f"{m['max_change']:.2e}"])
    return table


def run_audit(model, cfg, split: dict) -> dict:
    """Audit, print the table and the verdict, return the JSON-ready result."""
    result = audit(model, cfg, split)
    print(audit_table(result))
    if result["batch_independent"]:
        print(f"embeddings are batch-independent (largest change {result['max_change']:.2e} < {TOLERANCE:g})")
    else:
        print(f"embeddings DEPEND ON THE BATCH: an embedding moved by {100 * result['max_change']:.2f}% of its "
              f"norm when its batch changed; metrics depend on test-set order and batch size (SPEC 8)")
    return result
