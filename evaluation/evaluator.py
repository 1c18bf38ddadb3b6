"""Embed a split's images and captions with a model and compute text-to-image (and image-to-text) metrics: the one
evaluator of validation, test.py and `sh run.sh test`, in one evaluation mode or several."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Sequence, Tuple

import prettytable
import torch

from evaluation.embed import check_precision, embed_loaders, model_device
from evaluation.metrics import format_table
from evaluation.scoring import feature_metrics


class ModesEncoder(torch.nn.Module):
    """A model's retrieval features in several evaluation modes side by side ([B, modes x F]).

    One pass over the data then serves every mode, and each mode still sees exactly the batches a separate
    evaluation would (file order, test_batch_size), so a reference mode's numbers are those of its protocol.
    """

    def __init__(self, model: torch.nn.Module, modes: Sequence[str]):
        super().__init__()
        self.model = model
        self.modes = list(modes)

    def features(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        outputs = []
        for mode in self.modes:
            self.model.set_mode(mode)
            outputs.append(self.model.features(modality, inputs))
        return torch.cat(outputs, dim=1)


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

    def evaluate_modes(self, model: torch.nn.Module, modes: Sequence[str]) -> Dict[str, dict]:
        """t2i metrics of a RetrievalModel in each of its evaluation `modes` (model/head.py), from one pass over the
        data; the model is left in the mode it was in."""
        current = model.mode
        try:
            feats = embed_loaders(ModesEncoder(model, modes), self.img_loader, self.txt_loader,
                                  precision=self.precision, desc=self.desc)
        finally:
            model.set_mode(current)
        width, results = model.feature_dim, {}
        for k, mode in enumerate(modes):
            columns = slice(k * width, (k + 1) * width)
            results[mode] = feature_metrics(feats["text_feats"][:, columns], feats["image_feats"][:, columns],
                                            feats["text_pids"], feats["image_pids"], device=model_device(model))["t2i"]
        return results
