"""TBPS-CLIP's head (SPEC 13): no new module but a learnable temperature and the SS projection, and the embeddings
its losses (losses.py) need beyond the step's own: the model's own soft labels, a second image view, SimCLR views.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import nn

from model.head import Head
from model.registry import HeadContext, register_head
from utils.schema import Option

MAX_SCALE = 100.0


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


@register_head("tbps", lr_factor=1.0, order=50,
               options=[Option("softlabel_ratio", float, 0.5, "TBPS-CLIP N-ITC: share of the model's own soft "
                                                              "labels in the targets after the first epoch.",
                               minimum=0),
                        Option("mvs_image", bool, True, "TBPS-CLIP N-ITC: average with the loss of a second view "
                                                        "of each image.")])
def build_tbps_head(cfg, ctx: HeadContext) -> TBPSHead:
    return TBPSHead(ctx.dim, "nitc" in cfg.losses, "nitc" in cfg.losses and cfg.mvs_image, "ss" in cfg.losses,
                    cfg.softlabel_ratio)
