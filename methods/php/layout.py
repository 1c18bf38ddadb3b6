"""PHP's published run folder (SPEC 8, 9): IRRA's layout, with the CRFM as `safl.*` and the EFP blocks as
`shared_transformer.resblocks.N.*` (the reference's names; this package's head `php.crfm.*` / `php.efp.*`). Its
runs are evaluated in the release's own mode, `php_v1` (the EFP attends across the batch, SPEC 8), beside this
project's batch-independent one.

Ignored keys, and why:
- `safl.pos_embeding`: a parameter the reference defines but never uses.
- `shared_transformer.resblocks.N.feed_forward.expert_count_accum` / `token_count_accum`: the reference's routing
  counters; this project counts expert usage per evaluation instead (head.py).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from methods.irra.layout import BACKBONE_RULE, IRRA_HEAD_RULES, has_backbone
from model.layouts import Layout, register_layout

from .head import REFERENCE_MODE

_BLOCK = r"^shared_transformer\.resblocks\.(\d+)\."
RULES = [
    BACKBONE_RULE,
    (r"^safl\.part_tokens$", "php.crfm.part_tokens"),
    (r"^safl\.feed\.0\.", "php.crfm.ffn.norm."),
    (r"^safl\.feed\.1\.", "php.crfm.ffn.fc1."),
    (r"^safl\.feed\.4\.", "php.crfm.ffn.fc2."),
    (_BLOCK + r"comb_param$", r"php.efp.blocks.\1.moe.context"),
    (_BLOCK + r"feed_forward\.alpha$", r"php.efp.blocks.\1.moe.alpha"),
    (_BLOCK + r"feed_forward\.input_gate\.weight$", r"php.efp.blocks.\1.moe.input_gate.weight"),
    (_BLOCK + r"feed_forward\.task_gate\.weight$", r"php.efp.blocks.\1.moe.context_gate.weight"),
    (_BLOCK + r"feed_forward\.experts\.(\d+)\.(norm|down|up)\.(weight|bias)$",
     r"php.efp.blocks.\1.moe.experts.\2.\3.\4"),
    (_BLOCK + r"(attn|ln_1|ln_2|ln_3|mlp)\.", r"php.efp.blocks.\1.\2."),
    *IRRA_HEAD_RULES,
]
IGNORED = [r"^safl\.pos_embeding$", _BLOCK + r"feed_forward\.(expert_count_accum|token_count_accum)$"]


def _detect(keys) -> bool:
    return has_backbone(keys) and any(k.startswith(("safl.", "shared_transformer.")) for k in keys)


def _convert(key: str, value: torch.Tensor) -> torch.Tensor:
    if key.endswith("moe.context") and value.dim() == 1:
        return value.unsqueeze(0)  # the reference's one shared context vector
    return value


def translate_config(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    """How the reference trained: unmasked CRFM over text padding, one shared gate context, EFP attention across
    the batch, MLM x0.5."""
    values.setdefault("crfm_mask_padding", False)
    values.setdefault("gate_context", "shared")
    values["efp_attention"] = "batch"
    if values.get("mlm_loss_weight") is not None:
        values["mlm_loss_weight"] = 0.5 * float(values["mlm_loss_weight"])
    return values


register_layout(Layout("php_v1", detect=_detect, rules=RULES, ignored=IGNORED, convert=_convert,
                       translate_config=translate_config, mode=REFERENCE_MODE, method="PHP", priority=20))
