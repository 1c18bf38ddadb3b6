"""IRRA's losses beyond the shared ones (SPEC 7): identity classification of both modalities, and the masked-language
model's cross-entropy (implicit relation reasoning). Their weights are options; an empty MLM weight takes the
default an active head declares (the PHP reference's 0.5), else 1."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from model.registry import register_loss
from utils.schema import Option


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity classification of both modalities, averaged."""
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked-token predictions (already restricted to labelled positions)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


@register_loss("id", weight="id_loss_weight", needs=("classifier",),
               options=[Option("id_loss_weight", float, 1.0, "Weight of the ID loss.", minimum=0)])
def _id(out, cfg) -> Dict[str, torch.Tensor]:
    image_logits, text_logits, pids = out["image_logits"].float(), out["text_logits"].float(), out["pids"]
    return {"loss": id_loss(image_logits, text_logits, pids),
            "img_acc": (image_logits.argmax(dim=1) == pids).float().mean(),
            "txt_acc": (text_logits.argmax(dim=1) == pids).float().mean()}


@register_loss("mlm", weight="mlm_loss_weight", needs=("mlm",),
               options=[Option("mlm_loss_weight", Optional[float], None, "Weight of the MLM loss; empty: the default "
                                                                         "of an active head (PHP's 0.5), else 1.",
                               minimum=0)])
def _mlm(out, cfg) -> Dict[str, torch.Tensor]:
    logits, labels = out["mlm_logits"], out["mlm_labels"]
    accuracy = (logits.argmax(dim=1) == labels).float().mean() if labels.numel() else logits.new_zeros(())
    return {"loss": mlm_loss(logits, labels), "mlm_acc": accuracy}
