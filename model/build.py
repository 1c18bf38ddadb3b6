"""`build_model(cfg)`: assemble the backbone and the heads a configuration asks for."""
from __future__ import annotations

from typing import Optional

from open_clip.model import CLIP

from model.backbone import build_backbone
from model.irra_head import MLMHead, build_classifier
from model.php_head import PHPHead
from model.retrieval_model import RetrievalModel
from utils.config import Config, resolved_loss_weight
from utils.errors import UserError


def build_php_head(cfg: Config, dim: int) -> Optional[PHPHead]:
    if cfg.php_modules == "none":
        return None
    if "efp" in cfg.php_modules and dim % cfg.moe_heads:
        raise UserError(f"moe_heads ({cfg.moe_heads}) must divide the embedding width {dim}")
    if dim % cfg.reduction:
        raise UserError(f"reduction ({cfg.reduction}) must divide the embedding width {dim}")
    return PHPHead(dim, cfg.php_modules, cnum=cfg.cnum, moe_layers=cfg.moe_layers, moe_heads=cfg.moe_heads,
                   num_experts=cfg.num_experts, topk=cfg.topk, reduction=cfg.reduction,
                   efp_attention=cfg.efp_attention, gate_context=cfg.gate_context,
                   mask_padding=cfg.crfm_mask_padding)


def build_model(cfg: Config, num_classes: int = 0, backbone: Optional[CLIP] = None) -> RetrievalModel:
    """The model of `cfg`; `num_classes` (training identities) is needed for the ID loss.

    `backbone` replaces the one `cfg.pretrain_choice` names (used when loading a checkpoint, whose backbone
    shape comes from the checkpoint itself).
    """
    if backbone is None:
        backbone = build_backbone(cfg.pretrain_choice, cfg.img_size, cfg.text_length, cfg.pretrained_dir)
    patch = backbone.visual.patch_size
    patch = patch[0] if isinstance(patch, tuple) else patch
    if cfg.stride_size != patch:
        raise UserError(f"stride_size ({cfg.stride_size}) must equal the backbone's patch size ({patch}); "
                        f"overlapping patches are not supported")
    dim = backbone.text_projection.shape[1]
    losses = cfg.losses
    classifier = None
    if "id" in losses:
        if num_classes <= 0:
            raise UserError("loss 'id' needs the number of training identities (num_classes > 0)")
        classifier = build_classifier(dim, num_classes)
    mlm = MLMHead(dim, cfg.cmt_depth, backbone.vocab_size) if "mlm" in losses else None
    weights = {name: resolved_loss_weight(cfg, name) for name in losses}
    return RetrievalModel(backbone, weights, cfg.temperature, php=build_php_head(cfg, dim),
                          classifier=classifier, mlm=mlm)
