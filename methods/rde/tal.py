"""RDE's TAL, triplet alignment loss (SPEC 12), as a plain function of tensors and as the registered loss `tal`.

For B pairs with S = t^ i^T (rows captions, columns images, both L2-normalised), P_ij = [pid_i == pid_j] and
N = 1 - P, sample i's loss is

    l_i = [m - sum_j a_ij S_ij + tau log sum_j N_ij exp(S_ij / tau)]_+  +  the same on S^T,

a_i the softmax over the positives of row i of S / tau (detached), the sum inside the log clamped at 1e36. The
registered loss applies it to the global embeddings (BGE) and to TSE's, weights each sample by the consensus label
of RDE's sample selection (processor/ccd.py; 1 where no selection ran) and sums over the batch.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from model.registry import register_loss
from utils.schema import Option

from . import HEAD, LOSS, SELECTION

LOG_CLAMP = math.log(1e36)


def _direction(scores: torch.Tensor, positive: torch.Tensor, tau: float, margin: float) -> torch.Tensor:
    logits = scores / tau
    alpha = logits.masked_fill(~positive, float("-inf")).softmax(dim=1).detach()
    pulled = (alpha * scores).sum(dim=1)
    negative = ~positive
    has_negative = negative.any(dim=1, keepdim=True)
    # A row without negatives (all of one identity) has no push term; a safe input keeps its gradient finite.
    pushed = torch.where(has_negative, logits.masked_fill(positive, float("-inf")), torch.zeros_like(logits))
    push = tau * torch.logsumexp(pushed, dim=1).clamp(max=LOG_CLAMP)
    return (margin - pulled + torch.where(has_negative.squeeze(1), push, torch.full_like(push, -math.inf))).clamp(min=0)


def tal_per_sample(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, tau: float = 0.015,
                   margin: float = 0.1) -> torch.Tensor:
    """TAL of each of B pairs [B] (see the module docstring); the embeddings unnormalised, any width."""
    scores = F.normalize(text_feats.float(), dim=-1) @ F.normalize(image_feats.float(), dim=-1).t()
    pids = pids.reshape(-1, 1)
    positive = pids == pids.t()
    return _direction(scores, positive, tau, margin) + _direction(scores.t(), positive, tau, margin)


def sample_weights(out: Dict, name: str = SELECTION) -> torch.Tensor:
    """The batch's weights set by the per-epoch callback `name` (ones when it did not run)."""
    weights = out["batch"].get("sample_weights", {}).get(name)
    return torch.ones_like(out["image_feats"][:, 0]) if weights is None else weights.float()


@register_loss(LOSS, weight=1.0, needs=(HEAD,),
               options=[Option("tau", float, 0.015, "RDE TAL: temperature of the positive weights and of the "
                                                    "negatives' log-sum-exp.", positive=True),
                        Option("margin", float, 0.1, "RDE TAL: margin.", minimum=0),
                        Option("rde_ccd", bool, True, "RDE: select the pairs to train on before every epoch "
                                                      "(consensus division, processor/ccd.py); off: every pair.")])
def _tal(out, cfg) -> Dict[str, torch.Tensor]:
    weights = sample_weights(out)
    bge = (weights * tal_per_sample(out["image_feats"], out["text_feats"], out["pids"], cfg.tau, cfg.margin)).sum()
    tse = (weights * tal_per_sample(out["image_tse"], out["text_tse"], out["pids"], cfg.tau, cfg.margin)).sum()
    return {"loss": bge + tse, "tal_bge": bge.detach(), "tal_tse": tse.detach(), "kept": weights.mean().detach()}
