"""The training objectives of SPEC 7 as plain functions of tensors, and their registration by name.

Contrastive losses take the unnormalised image and text embeddings of B pairs ([B, D] each) and the identity
labels; `logit_scale` is 1 / temperature. Each returns a scalar tensor; weights are applied by the model. The
registered names (loss_names) are at the end of the file; a plug-in registers its own the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from model.registry import register_loss

EPS = 1e-8


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric InfoNCE with the diagonal as targets, the mean of both directions."""
    logits = logit_scale * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _matching_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i sum_j p_ij (log p_ij - log(target_ij + eps)), p = softmax over rows of `logits`."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(target + EPS))).sum(dim=1).mean()


def _same_identity(pids: torch.Tensor) -> torch.Tensor:
    pids = pids.reshape(-1, 1)
    return (pids == pids.t()).float()


def sdm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
             logit_scale: float) -> torch.Tensor:
    """Similarity distribution matching (IRRA): KL to the row-normalised same-identity matrix, i2t + t2i."""
    labels = _same_identity(pids)
    target = labels / labels.sum(dim=1, keepdim=True)
    cosine = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()
    return _matching_kl(logit_scale * cosine, target) + _matching_kl(logit_scale * cosine.t(), target)


def cmpm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Cross-modal projection matching: as SDM on unnormalised x normalised projections, L2-normalised labels."""
    labels = _same_identity(pids)
    target = labels / labels.norm(dim=1, keepdim=True)
    image_proj_text = image_feats @ F.normalize(text_feats, dim=-1).t()
    text_proj_image = text_feats @ F.normalize(image_feats, dim=-1).t()
    return _matching_kl(image_proj_text, target) + _matching_kl(text_proj_image, target)


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity classification of both modalities, averaged."""
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked-token predictions (already restricted to labelled positions)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------------------- registered losses
# `out` holds the step's tensors (RetrievalModel.forward lists them); the model computes every loss with autocast
# off, on float32 features, as the references do.

def _php(cfg) -> bool:
    return cfg.php_modules != "none"


def _reference_weight(value: Callable[[Any], Optional[float]], php_default: float) -> Callable[[Any], float]:
    """A weight option that is empty by default: the PHP reference's value with a PHP head, 1 without."""
    return lambda cfg: float(value(cfg)) if value(cfg) is not None else (php_default if _php(cfg) else 1.0)


@register_loss("itc", weight=_reference_weight(lambda cfg: cfg.itc_loss_weight, 5.0), global_batch=True)
def _itc(out, cfg) -> torch.Tensor:
    return itc_loss(out["image_feats"], out["text_feats"], out["logit_scale"])


@register_loss("sdm", weight="sdm_loss_weight", global_batch=True)
def _sdm(out, cfg) -> torch.Tensor:
    return sdm_loss(out["image_feats"], out["text_feats"], out["pids"], out["logit_scale"])


@register_loss("cmpm", weight="cmpm_loss_weight", global_batch=True)
def _cmpm(out, cfg) -> torch.Tensor:
    return cmpm_loss(out["image_feats"], out["text_feats"], out["pids"])


@register_loss("id", weight="id_loss_weight", needs=("classifier",))
def _id(out, cfg) -> Dict[str, torch.Tensor]:
    image_logits, text_logits, pids = out["image_logits"].float(), out["text_logits"].float(), out["pids"]
    return {"loss": id_loss(image_logits, text_logits, pids),
            "img_acc": (image_logits.argmax(dim=1) == pids).float().mean(),
            "txt_acc": (text_logits.argmax(dim=1) == pids).float().mean()}


@register_loss("mlm", weight=_reference_weight(lambda cfg: cfg.mlm_loss_weight, 0.5), needs=("mlm",))
def _mlm(out, cfg) -> Dict[str, torch.Tensor]:
    logits, labels = out["mlm_logits"], out["mlm_labels"]
    accuracy = (logits.argmax(dim=1) == labels).float().mean() if labels.numel() else logits.new_zeros(())
    return {"loss": mlm_loss(logits, labels), "mlm_acc": accuracy}


@register_loss("aux", weight="aux_factor", needs=("php",),
               check=lambda cfg: None if "efp" in cfg.php_modules else
               f"loss 'aux' needs the EFP (php_modules 'efp' or 'crfm+efp'); php_modules is {cfg.php_modules!r}")
def _aux(out, cfg) -> torch.Tensor:
    return out["image_aux"] + out["text_aux"]
