"""`load_model`: a trained run (this project's, or a published release's folder, model/layouts.py) ready for
evaluation.

Every size comes from the checkpoint itself (no CLIP file and no data set are read): the backbone's, and the
options each head's weights imply (HeadSpec.sizes). `compat` decides the evaluation mode: 'none' is every head's
own (batch-independent embeddings); a head may reproduce a reference release under a mode of its own (the PHP
head's 'php_v1' attends across the batch, SPEC 8); 'auto' is the mode a published layout was evaluated in, and
for this project's runs what their config says.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from model.backbone import build_clip, shape_from_state_dict
from model.build import build_model
from model.layouts import (PROJECT, compat_modes, detect_layout, map_published_state_dict, mode_for, run_files,
                           strip_module_prefix, translate_published_config)
from model.registry import HEADS
from model.retrieval_model import RetrievalModel
from utils.checkpoint import read_checkpoint, verify_in_background
from utils.config import Config, config_from_values, read_yaml
from utils.errors import UserError
from utils.plugins import changed_plugins, load_methods

logger = logging.getLogger("php")

class CompatibilityWarning(UserWarning):
    """Raised (as a warning) whenever a model runs with batch-dependent embeddings."""


@dataclass(frozen=True)
class LoadedRun:
    """A trained run ready for evaluation: what `load_model` returns."""

    model: RetrievalModel  # in eval mode, on the requested device
    cfg: Config  # the run's config, resolved: the file, the checkpoint's sizes, the overrides
    layout: str  # of the checkpoint: 'project' or a published release's (model/layouts.py)
    compat: str  # the mode the model runs in: 'none' (batch-independent embeddings) or a head's reference mode
    checkpoint_path: str
    # What the run trained with, as its checkpoint records it (utils.provenance.code_and_data; empty for
    # published checkpoints): commit, annotations_sha256, plugins_sha256.
    trained_with: Dict[str, Any] = field(default_factory=dict)
    # What differs now from what it trained with (a plug-in file changed, ...), one phrase each; also warned.
    changes: Tuple[str, ...] = ()


def find_checkpoint(config_file: str, checkpoint: Optional[str]) -> str:
    folder = os.path.dirname(os.path.abspath(config_file))
    name = dict(run_files()).get(os.path.basename(config_file), "best.pth")
    path = checkpoint or os.path.join(folder, name)
    if not os.path.isfile(path):
        where = f"run folder {folder} has no {name}" if not checkpoint else f"checkpoint not found: {checkpoint}"
        raise UserError(f"{where} (train the run first; test.py and retrieve.py also take another checkpoint with "
                        f"--checkpoint)")
    return path


def read_state_dict(path: str, trusted: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Future]:
    """(the checkpoint's model weights, what it records the run trained with: its `provenance` or {}, and the
    verification of its weight checksums, running in a thread: `.result()` raises for a damaged file)."""
    obj = read_checkpoint(path, trusted=trusted, verify=False)
    verified = verify_in_background(obj, path)
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a model checkpoint (expected a state dict or {{'model': state_dict, ...}})")
    provenance = obj.get("provenance") if isinstance(obj, dict) else None
    return strip_module_prefix(state), dict(provenance) if isinstance(provenance, dict) else {}, verified


def head_sizes(state: Dict[str, torch.Tensor], dim: int) -> Dict[str, Any]:
    """The options the heads' weights imply (HeadSpec.sizes), for a state dict in this project's names."""
    load_methods()
    sizes: Dict[str, Any] = {}
    for spec in HEADS.values():
        if spec.sizes is not None:
            sizes.update(spec.sizes(state, dim))
    return sizes


def load_model(config_file: str, checkpoint: Optional[str] = None, device: str = "cpu", compat: str = "auto",
               overrides: Optional[Dict[str, Any]] = None, trusted: bool = False) -> LoadedRun:
    """The run of a config file: its model in eval mode on `device`, with its config, the checkpoint's layout,
    the compat mode the model runs in and the checkpoint's path (see LoadedRun)."""
    if compat not in compat_modes():
        raise UserError(f"compat must be one of {', '.join(compat_modes())}; got {compat!r}")
    raw = read_yaml(config_file)
    path = find_checkpoint(config_file, checkpoint)
    state, trained_with, verified = read_state_dict(path, trusted)
    layout = detect_layout(state, path)
    if layout != PROJECT:
        state = map_published_state_dict(state, path, layout)
        raw = translate_published_config(raw, layout, config_file)

    shape = shape_from_state_dict(state, prefix="backbone.")
    sizes = {**head_sizes(state, shape.embed_dim), "text_length": shape.context_length}
    cfg = config_from_values({**raw, **sizes}, config_file, overrides, config_file)

    patches = state["backbone.visual.positional_embedding"].shape[0] - 1
    grid = (cfg.img_size[0] // shape.patch_size, cfg.img_size[1] // shape.patch_size)
    if grid[0] * grid[1] != patches:
        raise UserError(f"{config_file}: img_size {cfg.img_size} gives {grid[0]}x{grid[1]} patches but the "
                        f"checkpoint's position embedding has {patches}")
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    # Heads a published run carries beyond its loss_names are loaded too, so that no weight goes unused.
    present = [name for name in HEADS if any(key.startswith(name + ".") for key in state)]
    model = build_model(cfg, num_classes, backbone=build_clip(shape, cfg.img_size, shape.context_length),
                        with_heads=present)
    verified.result()  # checked while the model was built
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise UserError(f"{path}: weights do not match the model of {config_file}: {'; '.join(parts)}")

    mode = mode_for(compat, layout)
    if mode is not None:
        for key, value in model.set_mode(mode).items():
            setattr(cfg, key, value)  # the config says how the model runs
    if model.batch_dependent:
        warnings.warn(model.mode_warning(), CompatibilityWarning, stacklevel=2)
    changes = tuple(f"plug-in {change}" for change in
                    changed_plugins(trained_with.get("plugins_sha256") or {}, cfg.custom_imports)) \
        if "plugins_sha256" in trained_with else ()
    for change in changes:
        logger.warning("%s: %s: its results may differ from the trained run's", config_file, change)
    return LoadedRun(model.to(device).eval(), cfg, layout, model.mode, path, trained_with, changes)
