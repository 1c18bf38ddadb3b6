"""The PHP head: CRFM then EFP, one set of weights for both modalities (SPEC 5).

`php_modules` selects the ablations: 'crfm' (mean of the K CRFM parts), 'efp' (EFP on the raw tokens),
'crfm+efp' (full PHP). The head returns the mean over its output tokens; the model adds it to the global feature.
During evaluation (eval mode) it counts, per modality and EFP block, how many tokens each expert received.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from model.crfm import CRFM
from model.efp import ATTENTION_MODES, EFP
from model.head import Embedding, Head
from model.registry import HeadContext, register_head
from utils.errors import UserError

MODALITIES = ("image", "text")


class PHPHead(Head):
    def __init__(self, dim: int, modules: str = "crfm+efp", cnum: int = 9, moe_layers: int = 4, moe_heads: int = 8,
                 num_experts: int = 4, topk: int = 2, reduction: int = 8, efp_attention: str = "tokens",
                 gate_context: str = "shared", mask_padding: bool = True):
        super().__init__()
        if efp_attention not in ATTENTION_MODES:
            raise ValueError(f"efp_attention must be one of {ATTENTION_MODES}, got {efp_attention!r}")
        self.modules_name = modules
        self.crfm = CRFM(dim, cnum) if "crfm" in modules else None
        num_contexts = 2 if gate_context == "per_modality" else 1
        self.efp = (EFP(dim, moe_layers, moe_heads, num_experts, topk, reduction, num_contexts)
                    if "efp" in modules else None)
        self.efp_attention = efp_attention
        self.mask_padding = mask_padding
        self.per_modality_context = num_contexts == 2
        self._usage: Dict[str, torch.Tensor] = {}

    @property
    def batch_dependent(self) -> bool:
        return self.efp is not None and self.efp_attention == "batch"

    def set_attention(self, mode: str) -> None:
        """'tokens' (within each sample) or 'batch' (across the batch, the reference release's behaviour)."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"efp_attention must be one of {ATTENTION_MODES}, got {mode!r}")
        self.efp_attention = mode

    def embed(self, tokens: torch.Tensor, modality: str, padding_mask: Optional[torch.Tensor] = None) -> Embedding:
        # The image's CLS token is the global feature already; the head parses the patches (SPEC 5).
        part, aux = self(tokens[:, 1:] if modality == "image" else tokens, modality, padding_mask)
        return part, {"aux": aux}

    def forward(self, tokens: torch.Tensor, modality: str, padding_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, D] (image patches without CLS, or all text positions); padding_mask [B, N] True = pad.

        Returns the pooled head feature [B, D] and the EFP balancing loss (0 without EFP).
        """
        mask = padding_mask if self.mask_padding else None
        x = tokens
        if self.crfm is not None:
            x = self.crfm(x, mask)
            mask = None
        aux = tokens.new_zeros((), dtype=torch.float32)
        if self.efp is not None:
            context = MODALITIES.index(modality) if self.per_modality_context else 0
            x, aux, counts = self.efp(x, context, self.efp_attention, mask)
            if not self.training:
                previous = self._usage.get(modality)
                self._usage[modality] = counts if previous is None else previous + counts
        if mask is None:
            return x.mean(dim=1), aux
        keep = (~mask).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1), aux

    def reset_expert_usage(self) -> None:
        self._usage = {}

    def expert_usage(self) -> Dict[str, torch.Tensor]:
        """Tokens routed to each expert since the last reset: {modality: LongTensor [blocks, experts]}."""
        return {m: c.detach().cpu().long() for m, c in self._usage.items()}


def usage_report(usage: Dict[str, torch.Tensor]) -> Dict[str, List[dict]]:
    """Per modality and block: each expert's share of routed tokens, the entropy and its maximum (log E)."""
    report: Dict[str, List[dict]] = {}
    for modality, counts in usage.items():
        rows = []
        for block, row in enumerate(counts.double()):
            total = row.sum().item()
            share = (row / total) if total > 0 else torch.zeros_like(row)
            nz = share[share > 0]
            entropy = float(-(nz * nz.log()).sum()) if total > 0 else 0.0
            rows.append({"block": block, "tokens": [int(v) for v in row.tolist()],
                         "share": [round(float(v), 6) for v in share.tolist()],
                         "entropy": entropy, "max_entropy": math.log(len(row))})
        report[modality] = rows
    return report


@register_head("php", enabled=lambda cfg: cfg.php_modules != "none", lr_factor="php_lr_factor")
def build_php_head(cfg, ctx: HeadContext) -> PHPHead:
    if "efp" in cfg.php_modules and ctx.dim % cfg.moe_heads:
        raise UserError(f"moe_heads ({cfg.moe_heads}) must divide the embedding width {ctx.dim}")
    if ctx.dim % cfg.reduction:
        raise UserError(f"reduction ({cfg.reduction}) must divide the embedding width {ctx.dim}")
    return PHPHead(ctx.dim, cfg.php_modules, cnum=cfg.cnum, moe_layers=cfg.moe_layers, moe_heads=cfg.moe_heads,
                   num_experts=cfg.num_experts, topk=cfg.topk, reduction=cfg.reduction,
                   efp_attention=cfg.efp_attention, gate_context=cfg.gate_context, mask_padding=cfg.crfm_mask_padding)
