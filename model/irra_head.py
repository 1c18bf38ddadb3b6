"""The IRRA head (SPEC 6): the identity classifier and implicit relation reasoning (masked language modelling).

MLM: the masked caption's tokens query the image tokens through cross-attention (its output replaces the text
tokens, no residual), then a `cmt_depth`-layer CLIP-style transformer, a LayerNorm, and the prediction head
Linear(D, D) -> QuickGELU -> LayerNorm -> Linear(D, vocab). Heads: D // 64.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from open_clip.transformer import QuickGELU, Transformer
from torch import nn


def build_classifier(dim: int, num_classes: int) -> nn.Linear:
    classifier = nn.Linear(dim, num_classes)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)
    return classifier


class MLMHead(nn.Module):
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
