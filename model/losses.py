"""The training objectives of SPEC 7 as plain functions of tensors, and their registration by name.

Contrastive losses take the unnormalised image and text embeddings of B pairs ([B, D] each) and the identity
labels; `logit_scale` is 1 / temperature. Each returns a scalar tensor; weights are applied by the model. The
registered names (loss_names) are at the end of the file; a plug-in registers its own the same way.
"""
from __future__ import annotations


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


# --------------------------------------------------------------------------------------- registered losses
# `out` holds the step's tensors (RetrievalModel.forward lists them); the model computes every loss with autocast
# off, on float32 features, as the references do.

@register_loss("itc", weight="itc_loss_weight", global_batch=True)
def _itc(out, cfg) -> torch.Tensor:
    return itc_loss(out["image_feats"], out["text_feats"], out["logit_scale"])


@register_loss("sdm", weight="sdm_loss_weight", global_batch=True)
def _sdm(out, cfg) -> torch.Tensor:
    return sdm_loss(out["image_feats"], out["text_feats"], out["pids"], out["logit_scale"])


@register_loss("cmpm", weight="cmpm_loss_weight", global_batch=True)
def _cmpm(out, cfg) -> torch.Tensor:
    return cmpm_loss(out["image_feats"], out["text_feats"], out["pids"])
