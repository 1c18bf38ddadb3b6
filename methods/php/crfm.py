"""CRFM, coarse relevant feature mapping (SPEC 5): K learnable part tokens pool a token sequence into K parts.

One set of weights serves both modalities. For a sequence X [B, N, D]: A = softmax_N(P X^T) (no scaling inside
the softmax), Y = A X / sqrt(D), then a feed-forward LN -> Linear(D, 4D) -> GELU -> Dropout(0.3) -> Linear(4D, D),
without a residual. Output [B, K, D].
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn


class CRFM(nn.Module):
    def __init__(self, dim: int, num_parts: int, dropout: float = 0.3):
        super().__init__()
        self.part_tokens = nn.Parameter(torch.empty(num_parts, dim))
        nn.init.kaiming_normal_(self.part_tokens)
        self.ffn = nn.Sequential(OrderedDict([
            ("norm", nn.LayerNorm(dim)),
            ("fc1", nn.Linear(dim, 4 * dim)),
            ("act", nn.GELU()),
            ("drop", nn.Dropout(dropout)),
            ("fc2", nn.Linear(4 * dim, dim)),
        ]))

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, D]; padding_mask [B, N], True where a position is padding (excluded from the softmax)."""
        logits = torch.einsum("kd,bnd->bkn", self.part_tokens.to(x.dtype), x)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask.unsqueeze(1), float("-inf"))
        attn = logits.float().softmax(dim=-1).to(x.dtype)
        parts = torch.bmm(attn, x) / math.sqrt(x.shape[-1])
        return self.ffn(parts)
