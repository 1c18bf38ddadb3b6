"""The mixture of experts inside each EFP block (SPEC 5).

Each expert is a bottleneck adapter with its own residual: e(x) = x + Drop(Up(Drop(GELU(Down(LN(x)))))), which
starts as the identity (Up is zero-initialised). The gate mixes a token term and a context term:
logits = (1 - a) W_in x + a W_g c, with c a learnable context vector (one shared by both modalities, as in the
reference, or one per modality) and a a learnable scalar. Each token takes its top-k experts, weighted by the
softmax over those k logits.

Load balancing: E * mean_e(p_e * f_e), p_e the mean routing probability and f_e the share of tokens that have e
among their top k. With uniform routing this equals k / E.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import nn


class Expert(nn.Module):
    def __init__(self, dim: int, reduction: int, dropout: float = 0.1):
        super().__init__()
        hidden = dim // reduction
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.up(self.drop(self.act(self.down(self.norm(x))))))


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor,
                        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E * mean_e(p_e * f_e) for gate logits [T, E] and the boolean top-k choice [T, E].

    `weight` [T] (1 = the token counts, 0 = it does not, e.g. text padding) restricts p, f and the token count to
    the counted tokens; a mask rather than indexing keeps every shape independent of the data, which graph
    capture (CUDA graphs) needs. `reduce` sums the per-expert sums and the token count over processes (see
    utils/distributed.py), so that p and f are the means over the global batch rather than this process's share.
    """
    num_experts = logits.shape[-1]
    probs, picked = logits.float().softmax(dim=-1), chosen.float()
    if weight is None:
        count = logits.new_full((1,), logits.shape[0], dtype=torch.float32)
    else:
        weight = weight.float().unsqueeze(-1)
        probs, picked, count = probs * weight, picked * weight, weight.sum().reshape(1)
    stats = torch.cat([probs.sum(dim=0), picked.sum(dim=0), count])
    if reduce is not None:
        stats = reduce(stats)
    p, f, count = stats[:num_experts], stats[num_experts:2 * num_experts], stats[-1].clamp(min=1)
    return num_experts * (p * f).mean() / count ** 2


class MoE(nn.Module):
    def __init__(self, dim: int, num_experts: int = 4, topk: int = 2, reduction: int = 8, dropout: float = 0.1,
                 num_contexts: int = 1):
        super().__init__()
        self.topk = topk
        self.experts = nn.ModuleList(Expert(dim, reduction, dropout) for _ in range(num_experts))
        self.input_gate = nn.Linear(dim, num_experts, bias=False)
        self.context_gate = nn.Linear(dim, num_experts, bias=False)
        self.context = nn.Parameter(torch.randn(num_contexts, dim))
        self.alpha = nn.Parameter(torch.tensor(0.5))
        # Set by utils.distributed.use_global_batch under DDP; used in training mode only.
        self.reduce_stats: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_deltas(self, tokens: torch.Tensor) -> torch.Tensor:
        """What every expert adds to every token, [T, D] -> [E, T, D] (expert_e(x) = x + delta_e), as batched
        products over the stacked weights: a dozen operations instead of a dozen per expert, since a GPU step at
        the papers' batch sizes is bound by launching them (benchmarks/step_ops.py counts them). The parameters
        stay in their `Expert` modules, so state-dict names do not change; dropout draws its mask over all
        experts' activations at once, independently per expert as before."""
        experts, first = self.experts, self.experts[0]

        def stacked(get: Callable[[Expert], torch.Tensor]) -> torch.Tensor:
            return torch.stack([get(e) for e in experts])

        normed = nn.functional.layer_norm(tokens, tokens.shape[-1:], eps=first.norm.eps)
        normed = torch.addcmul(stacked(lambda e: e.norm.bias).unsqueeze(1), normed,
                               stacked(lambda e: e.norm.weight).unsqueeze(1))
        hidden = torch.baddbmm(stacked(lambda e: e.down.bias).unsqueeze(1), normed,
                               stacked(lambda e: e.down.weight).transpose(1, 2))
        hidden = first.drop(first.act(hidden))
        return first.drop(torch.baddbmm(stacked(lambda e: e.up.bias).unsqueeze(1), hidden,
                                        stacked(lambda e: e.up.weight).transpose(1, 2)))

    def forward(self, x: torch.Tensor, context_index: int = 0, valid: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D]; valid [...] marks tokens that count for the balancing loss and usage (all by default).

        Returns the output (same shape as x), the balancing loss, and the number of tokens routed to each expert.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        context = self.context[context_index].to(tokens.dtype)
        logits = (1 - self.alpha) * self.input_gate(tokens) + self.alpha * self.context_gate(context)
        top_logits, top_index = logits.topk(self.topk, dim=-1)
        # logits.dtype, not tokens.dtype: under CUDA autocast the gate's output is bf16/fp16 while the tokens
        # (a LayerNorm output) are fp32, and scatter needs one dtype.
        weights = top_logits.float().softmax(dim=-1).to(logits.dtype)
        gates = torch.zeros_like(logits).scatter(-1, top_index, weights)
        # Every expert runs on every token: with K part tokens per sample the dense form is cheap, needs no
        # data-dependent indexing, and keeps all experts in the graph (which DDP requires).
        # Each expert returns x + delta_e, so the mixture is x * sum(gates) + sum_e gate_e * delta_e; the x term
        # stays in x's precision under autocast.
        deltas = self.expert_deltas(tokens)
        out = tokens * gates.sum(dim=-1, keepdim=True) + torch.einsum("te,etd->td", gates, deltas.to(gates.dtype))
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_index, True)
        weight = None if valid is None else valid.reshape(-1)
        aux = load_balancing_loss(logits, chosen, self.reduce_stats if self.training else None, weight)
        counts = chosen.sum(dim=0) if weight is None else (chosen & weight.unsqueeze(-1)).sum(dim=0)
        return out.reshape(shape), aux, counts
