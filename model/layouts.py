"""Checkpoint layouts: how a run folder's files are named and its weights spelt, by registered name.

This project's own layout (`project`: weights `backbone.*` and `<head>.*`, configs.yaml + best.pth) is here; each
method that reads a published release registers the release's layout beside its code (methods/<name>/layout.py):

    register_layout(Layout("mine", detect=lambda keys: any(k.startswith("net.") for k in keys),
                           rules=[(r"^net\\.", "backbone.")], method="Mine"))

A layout says how to recognise its state dict (`detect`, tried by `priority`, higher first), how to rename its
keys (`rules`: regular expressions tried in order, each applied once; `ignored`: keys it may drop; a key no rule
maps is an error naming it), how to read its config (`translate_config`, and `recognise_config` for a config file
that shows its layout by its shape), the files of its run folder (`run_files`), and the evaluation mode its runs
reproduce the release in (`mode`, a mode one of its heads declares; model/head.py). Published weights are mostly
fp16; they are cast to fp32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from utils.config import drop_retired
from utils.errors import UserError
from utils.plugins import load_methods

PROJECT = "project"
RUN_FILES_OF_PROJECT = ("configs.yaml", "best.pth")


@dataclass(frozen=True)
class Layout:
    name: str
    detect: Callable[[Sequence[str]], bool]
    rules: Sequence[Tuple[str, str]] = ()
    ignored: Sequence[str] = ()
    translate_config: Optional[Callable[[Dict[str, Any], str], Dict[str, Any]]] = None
    recognise_config: Optional[Callable[[Any], bool]] = None
    # A key's value as this project holds it, given its new name (a reshape the release's spelling needs).
    convert: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
    run_files: Tuple[str, str] = RUN_FILES_OF_PROJECT
    mode: str = "none"
    method: str = ""  # how a run of it is named where its config names none (the search page)
    priority: int = 0


LAYOUTS: Dict[str, Layout] = {
    PROJECT: Layout(PROJECT, detect=lambda keys: any(k.startswith("backbone.") for k in keys), priority=100)}


def register_layout(layout: Layout) -> Layout:
    """Add a published layout; a name taken by another is a ValueError (a programming error)."""
    if layout.name in LAYOUTS and LAYOUTS[layout.name] != layout:
        raise ValueError(f"layout {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout
    return layout


def run_files() -> List[Tuple[str, str]]:
    """Every (config, checkpoint) file-name pair a run folder may hold, this project's first."""
    load_methods()
    return list(dict.fromkeys(layout.run_files for layout in LAYOUTS.values()))


def detect_layout(state_dict: Dict[str, Any], source: str) -> str:
    load_methods()
    keys = list(state_dict)
    for layout in sorted(LAYOUTS.values(), key=lambda lay: -lay.priority):
        if layout.detect(keys):
            return layout.name
    known = ", ".join(name for name in LAYOUTS if name != PROJECT)
    raise UserError(f"{source}: not a checkpoint of this project nor of a published release it reads ({known}); "
                    f"first keys: {keys[:3]}")


def map_published_state_dict(state_dict: Dict[str, torch.Tensor], source: str,
                             layout: str) -> Dict[str, torch.Tensor]:
    """Rename a published state dict to this project's names, in fp32."""
    spec = LAYOUTS[layout]
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if any(re.match(p, key) for p in spec.ignored):
            continue
        for pattern, replacement in spec.rules:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key, count=1)
                break
        else:
            unknown.append(key)
            continue
        value = value.float() if value.is_floating_point() else value
        out[new_key] = spec.convert(new_key, value) if spec.convert else value
    if unknown:
        raise UserError(f"{source}: {len(unknown)} unexpected weight(s) in a published checkpoint: "
                        f"{', '.join(unknown[:5])}")
    return out


def translate_published_config(raw: Dict[str, Any], layout: str, source: str) -> Dict[str, Any]:
    """Config values of a published run, in this project's meaning (SPEC 8, 11): the layout's translation, then
    the reference's options that mean nothing here dropped (the log lists them, utils.config.drop_retired)."""
    spec = LAYOUTS[layout]
    values = spec.translate_config(dict(raw), source) if spec.translate_config else dict(raw)
    values, _ = drop_retired(values, f"{source} (published {layout} run)")
    # A published run's output_dir is its own folder and resume flags are those of its training: not ours.
    for key in ("output_dir", "resume", "resume_ckpt_file"):
        values.pop(key, None)
    return values


def recognised_layout(values: Any) -> Optional[str]:
    """The published layout whose config file `values` are by their shape (None: this project's flat one)."""
    load_methods()
    return next((layout.name for layout in LAYOUTS.values()
                 if layout.recognise_config is not None and layout.recognise_config(values)), None)


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def mode_for(compat: str, layout: str) -> Optional[str]:
    """The evaluation mode a loaded run runs in: `compat`'s; with 'auto' the mode its published layout
    reproduces, or None (the run's own configuration) for this project's runs."""
    if compat != "auto":
        return compat
    mode = LAYOUTS[layout].mode
    return mode if mode != "none" else None


def compat_modes() -> List[str]:
    """'auto', 'none' and the modes the registered layouts reproduce their releases in (what `--compat` takes)."""
    load_methods()
    return ["auto", "none", *dict.fromkeys(lay.mode for lay in LAYOUTS.values() if lay.mode != "none")]


def check_compat(mode: str, source: str = "command line") -> str:
    """`mode` when it is one of compat_modes(), else a UserError naming them."""
    if mode not in compat_modes():
        raise UserError(f"{source}: --compat must be one of {', '.join(compat_modes())}; got {mode!r}")
    return mode
