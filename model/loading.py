"""`load_model`: a trained run (this project's, or a published IRRA / PHP folder) ready for evaluation.

Every size comes from the checkpoint itself (no CLIP file and no data set are read). `compat` decides how the
PHP head's EFP attention runs: 'none' within each sample (batch-independent embeddings), 'php_v1' across the
batch as in the PHP reference release (SPEC 8), 'auto' = php_v1 for a published PHP checkpoint, otherwise what
the run's config says.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

from model.backbone import build_clip, shape_from_state_dict
from model.build import build_model
from model.checkpoint_compat import (PHP_V1, PROJECT, detect_layout, head_sizes, map_published_state_dict,
                                     strip_module_prefix, translate_published_config)
from model.irra_head import MLMHead, build_classifier
from model.retrieval_model import RetrievalModel
from utils.checkpoint import read_checkpoint
from utils.config import Config, apply, read_yaml, validate
from utils.errors import UserError

COMPAT_MODES = ("auto", "none", "php_v1")
COMPAT_WARNING = (
    "compatibility mode php_v1: the EFP attention runs ACROSS THE BATCH as in the PHP reference release, so each "
    "embedding depends on the other samples in its batch and test numbers depend on the test-set order and batch "
    "size (SPEC 8). Use compat 'none' (--compat none) for batch-independent embeddings.")


class CompatibilityWarning(UserWarning):
    """Raised (as a warning) whenever a model runs with batch-dependent embeddings."""


def find_checkpoint(config_file: str, checkpoint: Optional[str]) -> str:
    path = checkpoint or os.path.join(os.path.dirname(os.path.abspath(config_file)), "best.pth")
    if not os.path.isfile(path):
        where = f"run folder {os.path.dirname(os.path.abspath(config_file))} has no best.pth" if not checkpoint \
            else f"checkpoint not found: {checkpoint}"
        raise UserError(f"{where} (train the run first, or name a checkpoint with --checkpoint)")
    return path


def read_state_dict(path: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    obj = read_checkpoint(path, trusted=trusted)
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a model checkpoint (expected a state dict or {{'model': state_dict, ...}})")
    return strip_module_prefix(state)


def load_model(config_file: str, checkpoint: Optional[str] = None, device: str = "cpu", compat: str = "auto",
               overrides: Optional[Dict[str, Any]] = None, trusted: bool = False) -> RetrievalModel:
    """The model of a run folder in eval mode on `device`.

    The returned model carries `.cfg` (the resolved Config), `.compat` ('none' or 'php_v1'), `.layout`
    ('project', 'php_v1' or 'irra') and `.checkpoint_path`.
    """
    if compat not in COMPAT_MODES:
        raise UserError(f"compat must be one of {', '.join(COMPAT_MODES)}; got {compat!r}")
    raw = read_yaml(config_file)
    path = find_checkpoint(config_file, checkpoint)
    state = read_state_dict(path, trusted)
    layout = detect_layout(state, path)
    if layout != PROJECT:
        state = map_published_state_dict(state, path)
        raw = translate_published_config(raw, layout)

    shape = shape_from_state_dict(state, prefix="backbone.")
    cfg = Config()
    apply(cfg, raw, config_file)
    apply(cfg, head_sizes(state, shape.embed_dim), path)
    cfg.text_length = shape.context_length
    if overrides:
        apply(cfg, overrides, "command line")
    validate(cfg, config_file)

    patches = state["backbone.visual.positional_embedding"].shape[0] - 1
    grid = (cfg.img_size[0] // shape.patch_size, cfg.img_size[1] // shape.patch_size)
    if grid[0] * grid[1] != patches:
        raise UserError(f"{config_file}: img_size {cfg.img_size} gives {grid[0]}x{grid[1]} patches but the "
                        f"checkpoint's position embedding has {patches}")
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    model = build_model(cfg, num_classes, backbone=build_clip(shape, cfg.img_size, shape.context_length))
    # Modules a published run carries beyond its loss_names are still loaded, so no weight goes unused.
    if model.classifier is None and num_classes:
        model.classifier = build_classifier(shape.embed_dim, num_classes)
    if model.mlm is None and "cmt_depth" in head_sizes(state, shape.embed_dim):
        model.mlm = MLMHead(shape.embed_dim, cfg.cmt_depth, shape.vocab_size)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise UserError(f"{path}: weights do not match the model of {config_file}: {'; '.join(parts)}")

    if compat == "php_v1" or (compat == "auto" and layout == PHP_V1):
        mode = "batch"
    elif compat == "none":
        mode = "tokens"
    else:
        mode = cfg.efp_attention
    model.set_efp_attention(mode)
    cfg.efp_attention = mode if model.php is not None else cfg.efp_attention
    model.compat = "php_v1" if model.batch_dependent else "none"
    if model.batch_dependent:
        warnings.warn(COMPAT_WARNING, CompatibilityWarning, stacklevel=2)
    model.cfg, model.layout, model.checkpoint_path = cfg, layout, path
    return model.to(device).eval()
