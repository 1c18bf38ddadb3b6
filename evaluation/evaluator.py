"""Embed a split's images and captions with a model and compute text-to-image (and image-to-text) metrics."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Tuple

import prettytable
import torch

from evaluation.embed import check_precision, embed_loaders, model_device
from evaluation.metrics import format_table
from evaluation.scoring import feature_metrics


class Evaluator:
    """Retrieval evaluation of a model on one split.

    Args:
        img_loader: yields `{"pids": LongTensor[B], "images": FloatTensor[B, 3, H, W]}` (the gallery).
        txt_loader: yields `{"pids": LongTensor[B], "caption_ids": LongTensor[B, L]}` (the queries).
        precision: "fp32", or "bf16" / "fp16" to run the encoders under autocast (outputs are cast to float32).
        logger: if given, the metrics table is logged through `logger.info`.
        desc: prefix of the progress bars.
    """

    def __init__(self, img_loader: Iterable, txt_loader: Iterable, precision: str = "fp32",
                 logger: Optional[logging.Logger] = None, desc: str = "eval"):
        self.img_loader = img_loader
        self.txt_loader = txt_loader
        self.precision = check_precision(precision)
        self.logger = logger
        self.desc = desc

    def embed(self, model: torch.nn.Module, normalize: bool = True) -> Dict[str, torch.Tensor]:
        """The gallery's and the queries' embeddings with their pids; see `evaluation.embed.embed_loaders`."""
        return embed_loaders(model, self.img_loader, self.txt_loader, precision=self.precision,
                             normalize=normalize, desc=self.desc)

    def evaluate(self, model: torch.nn.Module, i2t: bool = False) -> Tuple[Dict, prettytable.PrettyTable]:
        """Embed, score every caption against every image (cosine) and compute the metrics.

        Returns `({"t2i": metrics, "i2t": metrics (only if requested), "num_queries": captions,
        "num_gallery": images}, table)`, metrics as in `evaluation.metrics.retrieval_metrics`, scored by
        `evaluation.scoring.feature_metrics` on the model's device.
        """
        feats = self.embed(model)
        results: Dict = feature_metrics(feats["text_feats"], feats["image_feats"], feats["text_pids"],
                                        feats["image_pids"], device=model_device(model), i2t=i2t)
        results["num_queries"] = int(feats["text_pids"].numel())
        results["num_gallery"] = int(feats["image_pids"].numel())
        table = format_table(results)
        if self.logger is not None:
            self.logger.info("%s results:\n%s", self.desc, table)
        return results, table
