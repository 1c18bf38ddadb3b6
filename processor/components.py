"""Which registered components (heads, losses, data sets, callbacks, caption augmentations, token inputs) a run uses,
and so which of their options belong in its configs.yaml.

Every config has the options of every component the process knows (the built-in ones and its plug-ins'), so
that any of them can be set; a run writes only those of the components it uses, and setting one of a component it
does not use is an error (a typo of a method's option would otherwise be ignored in silence).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from datasets.augment import TOKEN_INPUTS
from model.registry import HEADS, LOSSES
from processor.callbacks import CALLBACKS
from utils.config import Config
from utils.errors import UserError, short_repr
from utils.plugins import COMPONENT_OPTIONS
from utils.schema import PLUGIN_OPTIONS


def _heads_used(cfg: Config) -> set:
    needed = {head for name in cfg.losses if name in LOSSES for head in LOSSES[name].needs}
    return {name for name, spec in HEADS.items() if spec.enabled(cfg) or name in needed}


USED: Dict[str, Callable[[Config, str], bool]] = {
    "head": lambda cfg, name: name in _heads_used(cfg),
    "loss": lambda cfg, name: name in cfg.losses,
    "data set": lambda cfg, name: name == cfg.dataset_name,
    "callback": lambda cfg, name: name in CALLBACKS and CALLBACKS[name].enabled(cfg),
    "caption augmentation": lambda cfg, name: name == cfg.caption_augment,
    "token inputs": lambda cfg, name: name in TOKEN_INPUTS and TOKEN_INPUTS[name].enabled(cfg),
}


def unused_options(cfg: Config) -> List[str]:
    """The options of the components `cfg` does not use (an option two components share, as a copy of a method
    shares its original's, is used when either is)."""
    unused, used_options = [], set()
    for (kind, name), options in COMPONENT_OPTIONS.items():
        used = USED.get(kind)
        if used is not None and not used(cfg, name):
            unused.extend(o for o in options if o in cfg.plugin_options and o not in unused)
        else:
            used_options.update(options)
    return [o for o in unused if o not in used_options]


def check_unused_options(cfg: Config) -> List[str]:
    """`unused_options(cfg)`, after refusing one that is set to other than its default: it would do nothing."""
    unused = unused_options(cfg)
    for name in unused:
        value, default = getattr(cfg, name), PLUGIN_OPTIONS[name].default
        if value != default:
            owner = next(f"{kind} {component!r}" for (kind, component), options in COMPONENT_OPTIONS.items()
                         if name in options)
            raise UserError(f"config: option '{name}' is set ({short_repr(value)}) but belongs to the {owner}, "
                            f"which this run does not use; remove it, or use the {owner.split()[0]}")
    return unused
