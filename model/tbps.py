"""TBPS-CLIP (SPEC 13): no new module, a learnable temperature and four losses, as plain functions of tensors and
as the registered losses `nitc`, `ritc`, `citc` and `ss`, with the head `tbps` that gives them what they need.

With s the logit scale, î, t̂ the L2-normalised image and text embeddings of B pairs, P the same-identity matrix
and Q = P / its row sums:
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

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from model.head import Head
from model.registry import HeadContext, register_head, register_loss
from utils.schema import Option

MAX_SCALE = 100.0


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


def clamped_exp(log_scale: torch.Tensor, maximum: float = MAX_SCALE) -> torch.Tensor:
    """min(exp(x), maximum) with the reference's gradient: it replaces the exponential's data by the clamped value,
    so the value is clamped but autograd still differentiates exp(x) unclamped (the gradient never vanishes)."""
    scale = log_scale.exp()
    return scale.clamp(max=maximum).detach() + (scale - scale.detach())


class TBPSHead(Head):
    """The learnable logit scale (`logit_scale`, ln(1 / 0.07) at start), the SS projection (`simclr_mlp`, D -> 128
    -> D) and, for the losses, the embeddings they need beyond the step's own (`outputs`)."""

    def __init__(self, dim: int, soft_labels: bool, second_view: bool, simclr: bool, softlabel_ratio: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.soft_labels, self.second_view, self.simclr = soft_labels, second_view, simclr
        self.softlabel_ratio = softlabel_ratio
        if simclr:
            self.simclr_mlp = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(inplace=True), nn.Linear(128, dim))

    def alpha(self, batch: Dict[str, Any]) -> float:
        """N-ITC's soft-label share: rising linearly over the first epoch's iterations (batch["progress"], epochs
        done), then `softlabel_ratio`."""
        progress = batch.get("progress")
        return self.softlabel_ratio * (1.0 if progress is None else min(1.0, float(progress)))

    def outputs(self, out: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        batch = out["batch"]
        res: Dict[str, Any] = {"logit_scale": clamped_exp(self.logit_scale.float()), "alpha": self.alpha(batch)}
        if self.soft_labels:
            with torch.no_grad():
                res["image_feats_d"] = model.encode_image(batch["images"])
                res["text_feats_d"] = model.encode_text(batch["caption_ids"])
            if self.second_view:
                res["image_mvs"] = model.encode_image(batch["view_mvs"])
                with torch.no_grad():
                    res["image_mvs_d"] = model.encode_image(batch["view_mvs"])
        if self.simclr:
            res["image_ss_1"] = self.simclr_mlp(model.encode_image(batch["view_ss_1"])).float()
            res["image_ss_2"] = self.simclr_mlp(model.encode_image(batch["view_ss_2"])).float()
        return res


TBPS_LOSSES = ("nitc", "ritc", "citc", "ss")


@register_head("tbps", lr_factor=1.0,
               options=[Option("softlabel_ratio", float, 0.5, "TBPS-CLIP N-ITC: share of the model's own soft "
                                                              "labels in the targets after the first epoch.",
                               minimum=0),
                        Option("mvs_image", bool, True, "TBPS-CLIP N-ITC: average with the loss of a second view "
                                                        "of each image.")])
def build_tbps_head(cfg, ctx: HeadContext) -> TBPSHead:
    return TBPSHead(ctx.dim, "nitc" in cfg.losses, "nitc" in cfg.losses and cfg.mvs_image, "ss" in cfg.losses,
                    cfg.softlabel_ratio)


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
