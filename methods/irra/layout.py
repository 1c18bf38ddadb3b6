"""IRRA's published run folder (SPEC 9): `configs.yaml` and `best.pth`, the CLIP backbone as `base_model.*` (OpenAI's
names), the ID classifier as `classifier.*` and the MLM branch's modules at the top level. The releases built on
IRRA's code (PHP, RDE) keep these names for the modules they share: their layouts use IRRA_HEAD_RULES.
"""
from __future__ import annotations

from model.layouts import Layout, register_layout

BACKBONE_RULE = (r"^base_model\.", "backbone.")
IRRA_HEAD_RULES = [
    (r"^classifier\.", "classifier."),
    (r"^(cross_attn|cross_modal_transformer|ln_pre_t|ln_pre_i|ln_post|mlm_head)\.", r"mlm.\1."),
]


def has_backbone(keys) -> bool:
    return any(k.startswith("base_model.") for k in keys)


register_layout(Layout("irra", detect=has_backbone, rules=[BACKBONE_RULE, *IRRA_HEAD_RULES], method="IRRA"))
