"""The IRRA head (SPEC 6): the identity classifier and implicit relation reasoning (masked language modelling).

MLM: the masked caption's tokens query the image tokens through cross-attention (its output replaces the text
tokens, no residual), then a `cmt_depth`-layer CLIP-style transformer, a LayerNorm, and the prediction head
Linear(D, D) -> QuickGELU -> LayerNorm -> Linear(D, vocab). Heads: D // 64.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict

import torch
from open_clip.transformer import QuickGELU, Transformer
from torch import nn

from model.backbone import text_tokens as backbone_text_tokens
from model.head import Head
from model.registry import HeadContext, register_head
from utils.errors import UserError
from utils.schema import Option


class IDClassifier(nn.Linear, Head):
    """The identity classifier over both modalities' embeddings (a plain Linear: its weights keep their names)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes)
        nn.init.normal_(self.weight, std=0.001)
        nn.init.zeros_(self.bias)

    def outputs(self, out: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        return {"image_logits": self(out["image_feats"]), "text_logits": self(out["text_feats"])}


# The references train the randomly initialised IRRA modules at lr * lr_factor (SPEC 10): the classifier and the
# MLM prediction head whole ("head_factor": biases included), the cross-modal modules except their biases.
@register_head("classifier", enabled=lambda cfg: False, lr_factor=1.0, lr_groups={"head_factor": [""]}, order=20)
def build_classifier(cfg, ctx: HeadContext) -> IDClassifier:
    if ctx.num_classes <= 0:
        raise UserError("loss 'id' needs the number of training identities (num_classes > 0)")
    return IDClassifier(ctx.dim, ctx.num_classes)


def mlm_sizes(state: Dict[str, Any], dim: int) -> Dict[str, Any]:
    """The MLM head's depth its weights (`mlm.*`) imply."""
    prefix = "mlm.cross_modal_transformer.resblocks."
    if not any(k.startswith("mlm.") for k in state):
        return {}
    return {"cmt_depth": len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})}


# The reference gives lr_factor to the parameters whose names contain `cross`: exactly these two modules' (the
# LayerNorms around them train at the base lr).
@register_head("mlm", enabled=lambda cfg: False, lr_factor=1.0,
               lr_groups={"head_factor": ["mlm_head"], "factor": ["cross_attn", "cross_modal_transformer"]},
               order=30, sizes=mlm_sizes,
               options=[Option("cmt_depth", int, 4, "Layers of the IRRA cross-modal transformer (MLM head).",
                               minimum=0)])
def build_mlm_head(cfg, ctx: HeadContext) -> "MLMHead":
    return MLMHead(ctx.dim, cfg.cmt_depth, ctx.vocab_size)


class MLMHead(Head):
    def __init__(self, dim: int, depth: int = 4, vocab_size: int = 49408):
        super().__init__()
        heads = max(1, dim // 64)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_modal_transformer = Transformer(dim, depth, heads, act_layer=QuickGELU)
        self.ln_pre_t = nn.LayerNorm(dim)
        self.ln_pre_i = nn.LayerNorm(dim)
        self.ln_post = nn.LayerNorm(dim)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(dim, dim)),
            ("gelu", QuickGELU()),
            ("ln", nn.LayerNorm(dim)),
            ("fc", nn.Linear(dim, vocab_size)),
        ]))
        self._init_weights(dim, depth)

    def _init_weights(self, dim: int, depth: int) -> None:
        # CLIP's transformer initialisation: residual branches scaled down with depth.
        attn_std = dim ** -0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc_std = (2 * dim) ** -0.5
        for block in self.cross_modal_transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def reason(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Cross-modal token features [B, L, D] for the masked caption's tokens given the image's tokens."""
        query = self.ln_pre_t(text_tokens)
        memory = self.ln_pre_i(image_tokens)
        x = self.cross_attn(query, memory, memory, need_weights=False)[0]
        x = self.cross_modal_transformer(x)
        return self.ln_post(x)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, labels: torch.Tensor):
        """Vocabulary logits at the labelled (masked) positions only, and those labels.

        Predicting only where a label is set gives the same loss as scoring all positions and ignoring the
        rest, without a [B, L, 49408] tensor.
        """
        feats = self.reason(text_tokens, image_tokens)
        where = labels > 0
        return self.mlm_head(feats[where]), labels[where]

    def outputs(self, out: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        batch = out["batch"]
        logits, labels = self(backbone_text_tokens(model.backbone, batch["mlm_ids"]), out["image_tokens"],
                              batch["mlm_labels"])
        return {"mlm_logits": logits, "mlm_labels": labels}
