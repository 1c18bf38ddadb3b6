"""`build_model(cfg)`: check the names a configuration uses, then assemble the backbone, its heads and losses."""
from __future__ import annotations

from typing import Optional, Sequence

from open_clip.model import CLIP

from model import losses  # noqa: F401 - the shared losses register themselves
from model.backbone import build_backbone
from model.registry import HEADS, LOSSES, HeadContext, loss_weight, ordered_heads, ordered_losses
from utils.plugins import load_methods
from model.retrieval_model import ActiveLoss, RetrievalModel
from utils.errors import UserError, did_you_mean, short_repr


def _unknown(kind: str, name: str, registered) -> UserError:
    return UserError(f"config: unknown {kind} {short_repr(name)}{did_you_mean(name, registered)} (registered: {', '.join(registered)}; a "
                     f"plug-in's own must be listed in custom_imports)")


def check_model_config(cfg) -> None:
    """Every loss and head the config names is registered and can work with the config; else one line."""
    load_methods()
    for name in cfg.losses:
        if name not in LOSSES:
            raise _unknown("loss", name, LOSSES)
        reason = LOSSES[name].check(cfg) if LOSSES[name].check else None
        if reason:
            raise UserError(f"config: {reason}")
    for name in cfg.heads:
        if name not in HEADS:
            raise _unknown("head", name, HEADS)


def build_model(cfg, num_classes: int = 0, backbone: Optional[CLIP] = None,
                with_heads: Sequence[str] = ()) -> RetrievalModel:
    """The model of `cfg`; `num_classes` (training identities) is needed for the ID loss.

    `backbone` replaces the one `cfg.pretrain_choice` names (used when loading a checkpoint, whose backbone
    shape comes from the checkpoint itself); `with_heads` adds heads beyond those the config asks for (a
    published run carries IRRA heads its losses do not use).
    """
    check_model_config(cfg)
    if backbone is None:
        backbone = build_backbone(cfg.pretrain_choice, cfg.img_size, cfg.text_length, cfg.pretrained_dir)
    patch = backbone.visual.patch_size
    patch = patch[0] if isinstance(patch, tuple) else patch
    if cfg.stride_size != patch:
        raise UserError(f"stride_size ({cfg.stride_size}) must equal the backbone's patch size ({patch}); "
                        f"overlapping patches are not supported")
    configure_backbone(backbone, cfg)
    context = HeadContext(dim=backbone.text_projection.shape[1], num_classes=num_classes,
                          vocab_size=backbone.vocab_size)
    needed = {head for name in cfg.losses for head in LOSSES[name].needs} | set(with_heads)
    # Built in their declared order: it fixes the order of the parameters (a saved optimizer state's) and of the
    # draws their initialisation takes from the RNG.
    heads = {name: HEADS[name].build(cfg, context)
             for name in ordered_heads(n for n, spec in HEADS.items() if spec.enabled(cfg) or n in needed)}
    active = {name: ActiveLoss(LOSSES[name], loss_weight(LOSSES[name], cfg, list(heads)), cfg)
              for name in ordered_losses(n for n in LOSSES if n in cfg.losses)}
    return RetrievalModel(backbone, heads, active, cfg.temperature)


def configure_backbone(backbone: CLIP, cfg) -> None:
    """The backbone options of the config: dropout on the text blocks' attention probabilities (TBPS-CLIP's 0.05;
    active in training mode only) and a frozen patch embedding."""
    for block in backbone.transformer.resblocks:
        if hasattr(block.attn, "attn_drop"):  # open_clip's custom blocks
            block.attn.attn_drop.p = float(cfg.text_attn_dropout)
        else:  # nn.MultiheadAttention (the default blocks)
            block.attn.dropout = float(cfg.text_attn_dropout)
    if cfg.freeze_patch_embed:
        backbone.visual.conv1.requires_grad_(False)
