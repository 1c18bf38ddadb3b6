"""EFP, expert-driven feature parsing (SPEC 5): transformer blocks over the part tokens with a mixture of experts.

Block: x = x + MHSA(LN1(x)); y = MoE(LN3(x)); x = x + MLP(LN2(x)) + y, with the CLIP-style MLP (QuickGELU).

Attention runs among the tokens of one sample ('tokens', the default), so an embedding depends on its own input
only. 'batch' reproduces the reference release, whose attention layer expects (sequence, batch, dim) but is fed
(batch, K, dim): each of the K slots then attends over the other samples of the batch (SPEC 8).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
from open_clip.transformer import QuickGELU
from torch import nn

from .moe import MoE

ATTENTION_MODES = ("tokens", "batch")


class EFPBlock(nn.Module):
    def __init__(self, dim: int, heads: int, num_experts: int, topk: int, reduction: int, num_contexts: int = 1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, 4 * dim)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * dim, dim)),
        ]))
        self.ln_3 = nn.LayerNorm(dim)
        self.moe = MoE(dim, num_experts, topk, reduction, num_contexts=num_contexts)

    def attention(self, x: torch.Tensor, mode: str, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if mode == "batch":
            x = x.transpose(0, 1)
            key_padding_mask = None
        out = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return out.transpose(0, 1) if mode == "batch" else out

    def forward(self, x: torch.Tensor, context_index: int, mode: str = "tokens",
                padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.attention(self.ln_1(x), mode, padding_mask)
        valid = None if padding_mask is None else ~padding_mask
        y, aux, counts = self.moe(self.ln_3(x), context_index, valid)
        x = x + self.mlp(self.ln_2(x)) + y
        return x, aux, counts


class EFP(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, num_experts: int, topk: int, reduction: int,
                 num_contexts: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(EFPBlock(dim, heads, num_experts, topk, reduction, num_contexts)
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor, context_index: int, mode: str = "tokens",
                padding_mask: Optional[torch.Tensor] = None):
        """Returns the parsed tokens, the summed balancing loss and per-block expert counts [layers, E]."""
        aux = x.new_zeros((), dtype=torch.float32)
        counts = []
        for block in self.blocks:
            x, block_aux, block_counts = block(x, context_index, mode, padding_mask)
            aux = aux + block_aux
            counts.append(block_counts)
        return x, aux, torch.stack(counts)
