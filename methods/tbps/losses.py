"""TBPS-CLIP's four losses (SPEC 13), as plain functions of tensors and as the registered losses `nitc`, `ritc`,
`citc` and `ss`. With s the logit scale (the head's, learnt), î, t̂ the L2-normalised image and text embeddings of
B pairs, P the same-identity matrix and Q = P / its row sums:
- N-ITC: cross-entropy of log softmax(s î t̂ᵀ) (and of its transpose) against α softmax(s î_d t̂_dᵀ) + (1 - α) Q,
  î_d, t̂_d the same model's embeddings of the same inputs computed again without gradient; the two directions
  averaged, and with a second image view (`mvs_image`) averaged again with the same loss for that view;
- R-ITC: ½ [KL(p_i2t ‖ Q + ε) + KL(p_t2i ‖ Q + ε)], p the softmax rows of s î t̂ᵀ and of its transpose;
- C-ITC: λ1 mean((ÎÎᵀ - T̂T̂ᵀ)²) + λ2 mean((ÎT̂ᵀ - T̂Îᵀ)²);
- SS: SimCLR's NT-Xent between two views of each image through `simclr_mlp`, each view's similarity to itself
  masked out.
The losses are global-batch losses: under DDP each sees every process's embeddings (utils/distributed.py), so a
run on 4 x 80 computes what one process on 320 does.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from model.registry import register_loss
from utils.schema import Option


def _targets(pids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    same = (pids.reshape(-1, 1) == pids.reshape(1, -1)).to(dtype)
    return same / same.sum(dim=1, keepdim=True)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def nitc_loss(image: torch.Tensor, text: torch.Tensor, image_d: torch.Tensor, text_d: torch.Tensor,
              pids: torch.Tensor, scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """N-ITC of one image view (module docstring); embeddings unnormalised, `image_d` / `text_d` detached."""
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    q = _targets(pids, i.dtype)
    with torch.no_grad():
        i_d, t_d = F.normalize(image_d, dim=-1), F.normalize(text_d, dim=-1)
        i2t = alpha * F.softmax(scale * i_d @ t_d.t(), dim=1) + (1 - alpha) * q
        t2i = alpha * F.softmax(scale * t_d @ i_d.t(), dim=1) + (1 - alpha) * q
    return (_soft_cross_entropy(scale * i @ t.t(), i2t) + _soft_cross_entropy(scale * t @ i.t(), t2i)) / 2


def ritc_loss(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, scale: torch.Tensor,
              eps: float = 1e-2) -> torch.Tensor:
    """R-ITC (module docstring), as the reference computes it with torch's kl_div."""
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    target = (_targets(pids, i.dtype) + eps).log()
    kl_i2t = F.kl_div(target, F.log_softmax(scale * i @ t.t(), dim=1), log_target=True, reduction="batchmean")
    kl_t2i = F.kl_div(target, F.log_softmax(scale * t @ i.t(), dim=1), log_target=True, reduction="batchmean")
    return 0.5 * (kl_i2t + kl_t2i)


def citc_loss(image: torch.Tensor, text: torch.Tensor, lambda1: float = 0.25, lambda2: float = 0.25) -> torch.Tensor:
    """C-ITC (module docstring); the reference scales both products by s and divides by s², which cancels."""
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    in_modal = (i @ i.t() - t @ t.t()).square().mean()
    cross_modal = (i @ t.t() - t @ i.t()).square().mean()
    return lambda1 * in_modal + lambda2 * cross_modal


def ss_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric NT-Xent of N images' two views [N, D] (module docstring)."""
    a, b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
    labels = torch.arange(a.shape[0], device=a.device)
    self_mask = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    aa = (a @ a.t() / temperature).masked_fill(self_mask, float("-inf"))
    bb = (b @ b.t() / temperature).masked_fill(self_mask, float("-inf"))
    loss_a = F.cross_entropy(torch.cat([a @ b.t() / temperature, aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([b @ a.t() / temperature, bb], dim=1), labels)
    return (loss_a + loss_b) / 2


@register_loss("nitc", weight=1.0, global_batch=True, needs=("tbps",),
               gathers=("image_feats_d", "text_feats_d", "image_mvs", "image_mvs_d"),
               views=lambda cfg: ("mvs",) if cfg.mvs_image else ())
def _nitc(out, cfg) -> Dict[str, torch.Tensor]:
    scale, alpha = out["logit_scale"], out["alpha"]
    loss = nitc_loss(out["image_feats"], out["text_feats"], out["image_feats_d"], out["text_feats_d"], out["pids"],
                     scale, alpha)
    if "image_mvs" in out:
        loss = (loss + nitc_loss(out["image_mvs"], out["text_feats"], out["image_mvs_d"], out["text_feats_d"],
                                 out["pids"], scale, alpha)) / 2
    return {"loss": loss, "alpha": torch.tensor(alpha)}


@register_loss("ritc", weight=1.0, global_batch=True, needs=("tbps",),
               options=[Option("ritc_eps", float, 1e-2, "TBPS-CLIP R-ITC: epsilon added to the targets.",
                               positive=True)])
def _ritc(out, cfg) -> torch.Tensor:
    return ritc_loss(out["image_feats"], out["text_feats"], out["pids"], out["logit_scale"], cfg.ritc_eps)


@register_loss("citc", weight=0.1, global_batch=True, needs=("tbps",),
               options=[Option("citc_lambda1", float, 0.25, "TBPS-CLIP C-ITC: weight of the in-modal term.",
                               minimum=0),
                        Option("citc_lambda2", float, 0.25, "TBPS-CLIP C-ITC: weight of the cross-modal term.",
                               minimum=0)])
def _citc(out, cfg) -> torch.Tensor:
    return citc_loss(out["image_feats"], out["text_feats"], cfg.citc_lambda1, cfg.citc_lambda2)


@register_loss("ss", weight=0.4, global_batch=True, needs=("tbps",), gathers=("image_ss_1", "image_ss_2"),
               views=("ss_1", "ss_2"),
               options=[Option("simclr_temperature", float, 0.1, "TBPS-CLIP SS: NT-Xent temperature.",
                               positive=True)])
def _ss(out, cfg) -> torch.Tensor:
    return ss_loss(out["image_ss_1"], out["image_ss_2"], cfg.simclr_temperature)
