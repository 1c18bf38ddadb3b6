"""Embed a split's images and captions with a model and compute text-to-image (and image-to-text) metrics."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import prettytable
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.errors import UserError
from utils.metrics import format_table, retrieval_metrics

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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
        if precision not in AUTOCAST_DTYPES:
            raise UserError(f"precision: expected one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.img_loader = img_loader
        self.txt_loader = txt_loader
        self.precision = precision
        self.logger = logger
        self.desc = desc

    def _embed_loader(self, loader: Iterable, key: str, encode: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device, what: str,
                      normalize: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per-batch float32 CPU embeddings (L2-normalised if `normalize`) and pids of one loader."""
        dtype = AUTOCAST_DTYPES[self.precision]
        feats, pids = [], []
        for batch in tqdm(loader, desc=f"{self.desc} {what}", disable=None, leave=False):
            if not isinstance(batch, Mapping) or key not in batch or "pids" not in batch:
                got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise UserError(f"{what} loader: expected dict batches with keys 'pids' and '{key}', got {got}")
            batch_pids = torch.as_tensor(batch["pids"]).long().reshape(-1).cpu()
            autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                out = encode(batch[key].to(device, non_blocking=True))
            if out.dim() != 2 or out.shape[0] != batch_pids.numel():
                raise UserError(f"{what} loader: a batch of {batch_pids.numel()} pids gave embeddings of shape "
                                f"{tuple(out.shape)}; expected [{batch_pids.numel()}, D]")
            out = out.float()
            feats.append((F.normalize(out, dim=-1) if normalize else out).cpu())
            pids.append(batch_pids)
        if not feats:
            raise UserError(f"{what} loader: yielded no batches; the split has no {what}")
        return feats, pids

    def embed(self, model: torch.nn.Module, normalize: bool = True) -> Dict[str, torch.Tensor]:
        """L2-normalised float32 CPU embeddings of the gallery images and the query captions, with their pids.

        `normalize=False` returns the encoders' raw outputs (as float32) instead. The model runs in eval mode
        under `torch.inference_mode()` on its own device; every module's train/eval mode is restored afterwards.
        `model.reset_expert_usage()`, when the model has it, is called first, so expert-usage counts cover exactly
        this evaluation.
        """
        device = _model_device(model)
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            reset = getattr(model, "reset_expert_usage", None)
            if callable(reset):
                reset()
            with torch.inference_mode():
                images = self._embed_loader(self.img_loader, "images", model.encode_image, device, "images",
                                            normalize)
                texts = self._embed_loader(self.txt_loader, "caption_ids", model.encode_text, device, "captions",
                                           normalize)
        finally:
            for module, training in modes:
                module.training = training
        # Concatenated outside inference mode: callers get ordinary tensors they may modify in place.
        return {"image_feats": torch.cat(images[0]), "image_pids": torch.cat(images[1]),
                "text_feats": torch.cat(texts[0]), "text_pids": torch.cat(texts[1])}

    def evaluate(self, model: torch.nn.Module, i2t: bool = False) -> Tuple[Dict, prettytable.PrettyTable]:
        """Embed, score every caption against every image (cosine) and compute the metrics.

        Returns `({"t2i": metrics, "i2t": metrics (only if requested), "num_queries": captions,
        "num_gallery": images}, table)`, metrics as in `utils.metrics.retrieval_metrics`. The similarity is
        computed on the model's device; i2t uses the transposed matrix with the roles of the pids swapped.
        """
        feats = self.embed(model)
        device = _model_device(model)
        with torch.no_grad():
            similarity = feats["text_feats"].to(device) @ feats["image_feats"].to(device).T
            results: Dict = {"t2i": retrieval_metrics(similarity, feats["text_pids"], feats["image_pids"])}
            if i2t:
                # A contiguous copy: gathering rows of a transposed view would read the matrix column-wise.
                similarity = similarity.T.contiguous()
                results["i2t"] = retrieval_metrics(similarity, feats["image_pids"], feats["text_pids"])
        del similarity
        results["num_queries"] = int(feats["text_pids"].numel())
        results["num_gallery"] = int(feats["image_pids"].numel())
        table = format_table(results)
        if self.logger is not None:
            self.logger.info("%s results:\n%s", self.desc, table)
        return results, table
