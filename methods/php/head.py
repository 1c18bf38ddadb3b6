"""The PHP head: CRFM then EFP, one set of weights for both modalities (SPEC 5).

`php_modules` selects the ablations: 'crfm' (mean of the K CRFM parts), 'efp' (EFP on the raw tokens),
'crfm+efp' (full PHP). The head returns the mean over its output tokens; the model adds it to the global feature.
During evaluation (eval mode) it counts, per modality and EFP block, how many tokens each expert received.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from model.head import Embedding, Head
from model.registry import HeadContext, register_head
from utils.config import register_rule
from utils.errors import UserError
from utils.schema import Option

from .crfm import CRFM
from .efp import ATTENTION_MODES, EFP
from .report import report_expert_usage

MODALITIES = ("image", "text")
MODULES = ("none", "crfm", "efp", "crfm+efp")
# The mode that reproduces the reference release (its EFP attends across the batch, SPEC 8); 'none' is this
# project's own, within each sample. The release's layout (layout.py) is evaluated in it.
REFERENCE_MODE = "php_v1"
_ATTENTION = {"none": "tokens", REFERENCE_MODE: "batch"}
WARNING = (f"compatibility mode {REFERENCE_MODE}: the EFP attention runs ACROSS THE BATCH as in the PHP reference "
           f"release, so each embedding depends on the other samples in its batch and test numbers depend on the "
           f"test-set order and batch size (SPEC 8). Use compat 'none' (--compat none) for batch-independent "
           f"embeddings.")


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

    modes = (REFERENCE_MODE,)

    @property
    def mode(self) -> str:
        return REFERENCE_MODE if self.batch_dependent else "none"

    def set_mode(self, mode: str) -> Dict[str, Any]:
        if mode not in _ATTENTION:
            return {}
        self.set_attention(_ATTENTION[mode])
        return {"efp_attention": _ATTENTION[mode]}

    def mode_warning(self) -> str:
        return WARNING if self.batch_dependent else ""

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

    def reset_report(self) -> None:
        self._usage = {}

    def expert_usage(self) -> Dict[str, torch.Tensor]:
        """Tokens routed to each expert since the last reset: {modality: LongTensor [blocks, experts]}."""
        return {m: c.detach().cpu().long() for m, c in self._usage.items()}

    def report(self, out_dir: Optional[str] = None) -> Dict[str, Any]:
        usage = self.expert_usage()
        return {"expert_usage": report_expert_usage(usage, out_dir)} if usage else {}


def sizes(state: Dict[str, Any], dim: int) -> Dict[str, Any]:
    """The head's options its weights (`php.*`) imply."""
    keys = state.keys()

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})

    has_crfm = "php.crfm.part_tokens" in state
    has_efp = any(k.startswith("php.efp.") for k in keys)
    found: Dict[str, Any] = {"php_modules": {(False, False): "none", (True, False): "crfm", (False, True): "efp",
                                             (True, True): "crfm+efp"}[(has_crfm, has_efp)]}
    if has_crfm:
        found["cnum"] = state["php.crfm.part_tokens"].shape[0]
    if has_efp:
        found["moe_layers"] = count("php.efp.blocks.")
        found["num_experts"] = count("php.efp.blocks.0.moe.experts.")
        found["reduction"] = dim // state["php.efp.blocks.0.moe.experts.0.down.weight"].shape[0]
        found["gate_context"] = "per_modality" if state["php.efp.blocks.0.moe.context"].shape[0] == 2 else "shared"
    return found


OPTIONS = [
    Option("php_modules", str, "none", "PHP head modules: crfm+efp (the full head), crfm or efp (ablations); none: "
                                       "no PHP head.", choices=MODULES),
    Option("cnum", int, 9, "Part tokens of the CRFM (K).", positive=True),
    Option("num_experts", int, 4, "Experts per EFP block.", positive=True),
    Option("topk", int, 2, "Experts each token is routed to.", positive=True),
    Option("reduction", int, 8, "Bottleneck reduction of each expert (D -> D / reduction).", positive=True),
    Option("moe_layers", int, 4, "EFP blocks.", positive=True),
    Option("moe_heads", int, 8, "Attention heads of each EFP block.", positive=True),
    Option("efp_attention", str, "tokens", "EFP self-attention: 'tokens' among a sample's part tokens (batch "
                                           "independent), or 'batch' across the batch as in the PHP reference "
                                           "release (embeddings depend on batch mates; for study only).",
           choices=ATTENTION_MODES),
    Option("crfm_mask_padding", bool, True, "Exclude text padding from the CRFM softmax (the reference did not)."),
    Option("gate_context", str, "shared", "EFP gate context vector shared by both modalities (reference) or one "
                                          "per modality.", choices=("shared", "per_modality")),
    Option("php_lr_factor", float, 1.0, "Learning-rate factor of the PHP head (the reference trains it at 1).",
           minimum=0),
]


def _topk_within_experts(get, source):
    if not 1 <= get("topk") <= get("num_experts"):
        raise UserError(f"{source}: option 'topk' must be between 1 and num_experts ({get('num_experts')}); "
                        f"got {get('topk')}")


register_rule(("topk", "num_experts"), _topk_within_experts)


# The PHP reference weights ITC x5 and IRRA's MLM x0.5 (SPEC 11); its parameters come first after the backbone's.
@register_head("php", enabled=lambda cfg: cfg.php_modules != "none", lr_factor="php_lr_factor", options=OPTIONS,
               order=10, loss_weights={"itc": 5.0, "mlm": 0.5}, sizes=sizes)
def build_php_head(cfg, ctx: HeadContext) -> PHPHead:
    if "efp" in cfg.php_modules and ctx.dim % cfg.moe_heads:
        raise UserError(f"moe_heads ({cfg.moe_heads}) must divide the embedding width {ctx.dim}")
    if ctx.dim % cfg.reduction:
        raise UserError(f"reduction ({cfg.reduction}) must divide the embedding width {ctx.dim}")
    return PHPHead(ctx.dim, cfg.php_modules, cnum=cfg.cnum, moe_layers=cfg.moe_layers, moe_heads=cfg.moe_heads,
                   num_experts=cfg.num_experts, topk=cfg.topk, reduction=cfg.reduction,
                   efp_attention=cfg.efp_attention, gate_context=cfg.gate_context, mask_padding=cfg.crfm_mask_padding)
