"""TBPS-CLIP's published run folder (SPEC 13): `config.yaml` (nested in misc / experiment / schedule / model / data)
beside `checkpoint_best.pth`, CLIP's image tower as `visual.*`, its text tower as `encode_text.*`, its own
`logit_scale` and `simclr_mlp.*` (this package's head, `tbps.*`); the IRRA modules its code can add keep IRRA's
names. The checkpoint's EasyDict config and numpy scalars are read by the restricted reader (checkpoint.py).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List

from methods.irra.layout import IRRA_HEAD_RULES
from model.layouts import Layout, register_layout
from utils.errors import UserError, short_repr

from . import checkpoint  # noqa: F401 - the checkpoint's extra types, allowed in the restricted reader

RULES = [
    (r"^visual\.", "backbone.visual."),
    (r"^encode_text\.", "backbone."),
    (r"^logit_scale$", "tbps.logit_scale"),
    (r"^simclr_mlp\.", "tbps.simclr_mlp."),
    *IRRA_HEAD_RULES,
]


# Losses TBPS-CLIP switches on by a flag of the same name in its `experiment` section.
_TBPS_LOSS_FLAGS = ("ritc", "citc", "ss", "id", "mlm")
_DATASETS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")


def looks_like_tbps_config(raw: Any) -> bool:
    """Whether a config file's values are TBPS-CLIP's nested ones (its `experiment` and `schedule` sections)."""
    return isinstance(raw, dict) and isinstance(raw.get("experiment"), dict) and isinstance(raw.get("schedule"), dict)


def translate_tbps_config(raw: Dict[str, Any], source: str = "config.yaml") -> Dict[str, Any]:
    """A TBPS-CLIP config (its config.yaml `source`, nested in misc / experiment / schedule / model / data) in this
    project's flat terms; what it names that means nothing here (device, paths on its authors' machine) is left
    out. A schedule value the translation computes with is checked here, naming its key as the file spells it."""
    exp, sched, model, data, misc = (_tbps_section(raw, name, source)
                                     for name in ("experiment", "schedule", "model", "data", "misc"))
    losses = ["nitc"] + [loss for loss in _TBPS_LOSS_FLAGS if exp.get(loss)]
    values: Dict[str, Any] = {
        "img_size": _tbps_resolution(exp.get("input_resolution", [224, 224]), source), "image_recipe": "tbps",
        "text_length": exp.get("text_length", 77), "caption_augment": "tbps",
        "text_attn_dropout": exp.get("dropout", 0.05), "freeze_patch_embed": True,
        "loss_names": "+".join(losses), "mvs_image": bool(exp.get("mvs_image", True)),
        "softlabel_ratio": model.get("softlabel_ratio", 0.5), "ritc_eps": exp.get("ritc_eps", 1e-2),
        "nitc_loss_weight": exp.get("nitc_ratio", 1.0), "ritc_loss_weight": exp.get("ritc_ratio", 1.0),
        "citc_loss_weight": exp.get("citc_ratio", 0.1), "ss_loss_weight": exp.get("ss_ratio", 0.4),
        "citc_lambda1": exp.get("citc_lambda1", 0.25), "citc_lambda2": exp.get("citc_lambda2", 0.25),
        "simclr_temperature": exp.get("simclr_temperature", 0.1), "optimizer": "AdamW", "lr_step": "iteration",
        "no_decay_1d": True, "bias_lr_factor": 1.0, "lrscheduler": "cosine", "warmup_method": "linear",
        "batch_size_scope": "per_process"}
    values.update(_tbps_schedule(sched, source))
    for ours, theirs in (("batch_size", "batch_size"), ("test_batch_size", "test_batch_size"),
                         ("num_workers", "num_workers")):
        if theirs in data:
            values[ours] = data[theirs]
    if isinstance(misc.get("seed"), int):
        values["seed"] = misc["seed"]
    folder = os.path.basename(os.path.normpath(str(raw.get("anno_dir", ""))))
    if folder in _DATASETS:
        values["dataset_name"] = folder
    return values


def _tbps_section(raw: Dict[str, Any], name: str, source: str) -> Dict[str, Any]:
    """A section of a TBPS-CLIP config; one it lacks is empty (the defaults apply), one that is no mapping is an
    error rather than a silent fall back to every default."""
    value = raw.get(name)
    if value is None:  # absent, or a YAML section with nothing under it
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: TBPS-CLIP's '{name}' must be a mapping of its options; got {short_repr(value)}")
    return value


def _tbps_resolution(size: Any, source: str) -> List[Any]:
    if isinstance(size, int) and not isinstance(size, bool):
        return [size, size]
    if isinstance(size, (list, tuple)):
        return list(size)
    raise UserError(f"{source}: experiment.input_resolution must be a size or [height, width]; got "
                    f"{short_repr(size)}")


def _tbps_number(sched: Dict[str, Any], name: str, default: float, source: str, positive: bool = False) -> float:
    """schedule.<name> as a finite number (or the string of one: YAML 1.1 reads `1e-4` as a string, which the
    reference's float() accepts); positive, or 0 and more."""
    value = sched.get(name, default)
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        expected = "a positive number" if positive else "a number, 0 or more"
        got = "nothing (null)" if value is None else short_repr(value)
        raise UserError(f"{source}: schedule.{name} must be {expected}; got {got}")
    return number


def _tbps_schedule(sched: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The options of TBPS-CLIP's `schedule` section: lr, its per-iteration warm-up from lr_start (a factor of lr
    here) and cosine down to lr_end, AdamW's weight decay, betas and eps."""
    lr = _tbps_number(sched, "lr", 1e-4, source, positive=True)
    betas = sched.get("betas", [0.9, 0.98])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise UserError(f"{source}: schedule.betas must be AdamW's two betas, [beta1, beta2], each 0 or more and "
                        f"below 1; got {short_repr(betas)}")
    return {"lr": lr, "num_epoch": sched.get("epoch", 5), "warmup_epochs": sched.get("epoch_warmup", 1),
            "warmup_factor": _tbps_number(sched, "lr_start", 1e-6, source) / lr,
            "target_lr": _tbps_number(sched, "lr_end", 5e-6, source),
            "weight_decay": _tbps_number(sched, "weight_decay", 0.02, source),
            "optimizer_eps": _tbps_number(sched, "eps", 1e-8, source), "alpha": betas[0], "beta": betas[1]}


def _detect(keys) -> bool:
    return any(k.startswith("visual.") for k in keys) and any(k.startswith("encode_text.") for k in keys)


register_layout(Layout("tbps", detect=_detect, rules=RULES, translate_config=translate_tbps_config,
                       recognise_config=looks_like_tbps_config, run_files=("config.yaml", "checkpoint_best.pth"),
                       method="TBPS-CLIP", priority=10))
