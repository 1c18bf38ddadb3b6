"""RDE's published run folder (SPEC 12): IRRA's layout, with the TSE layers as `visul_emb_layer.*` /
`texual_emb_layer.*` (the reference's spelling; this package's head `tse.image.*` / `tse.text.*`), and a config
whose `loss_names` spells the TAL options into the loss's name.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional

from methods.irra.layout import BACKBONE_RULE, IRRA_HEAD_RULES, has_backbone
from model.layouts import Layout, register_layout
from utils.errors import UserError, short_repr

from . import AUGMENT, HEAD, LAYOUT, LOSS, METHOD

RULES = [BACKBONE_RULE, *IRRA_HEAD_RULES,
         (r"^visul_emb_layer\.", f"{HEAD}.image."), (r"^texual_emb_layer\.", f"{HEAD}.text.")]


def _detect(keys) -> bool:
    return has_backbone(keys) and any(k.startswith(("visul_emb_layer.", "texual_emb_layer.")) for k in keys)


def translate_rde_config(values: Dict[str, Any], source: str = "configs.yaml") -> Dict[str, Any]:
    """An RDE configs.yaml in this project's terms: its `loss_names` (`TAL+sr0.3_tau0.015_margin0.1_n0.0`, the
    hyper-parameters spelled into the name) is the `tal` loss, whose options the file also holds (a key the file
    lacks takes the name's value; a key that contradicts the name is refused: which one trained is unknown);
    `txt_aug` is the caption augmentation `rde`; its noise file lay on its authors' machine (the noise rate stays,
    for the summary)."""
    loss_names = values.get("loss_names", "")
    names = [n.strip() for n in str(loss_names).split("+")]
    if not any(n.upper() == "TAL" for n in names):
        raise UserError(f"{source}: option 'loss_names' is {short_repr(loss_names)}; of published RDE runs only "
                        f"TAL runs are supported (SPEC 12)")
    out = {"loss_names": LOSS, "caption_augment": AUGMENT if values.get("txt_aug", False) else "none",
           "noisy_file": ""}
    for key, value in rde_name_options(names, loss_names, source).items():
        given = values.get(key)
        if given is None:
            out[key] = value
            continue
        number = _number(given)
        if number is not None and not math.isclose(number, value, rel_tol=1e-9, abs_tol=1e-12):
            raise UserError(f"{source}: option '{key}' is {short_repr(given)} but loss_names {short_repr(loss_names)} "
                            f"says {key} {value:g}; which one the run trained with is unknown: make them agree")
    return out


# The reference's run script spells these options into loss_names:
# TAL+sr<select_ratio>_tau<tau>_margin<margin>_n<noisy_rate>.
_RDE_NAME_KEYS = {"sr": "select_ratio", "tau": "tau", "margin": "margin", "n": "noisy_rate"}
_RDE_NAME_PART = re.compile(r"(sr|tau|margin|n)([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)")


def rde_name_options(names: List[str], loss_names: Any, source: str) -> Dict[str, float]:
    """{option: value} that the parts of an RDE loss_names after its losses spell (`sr0.3_tau0.015...`)."""
    found: Dict[str, float] = {}
    for part in names:
        if part.upper() == "TAL":
            continue
        for token in part.split("_"):
            match = _RDE_NAME_PART.fullmatch(token)
            if match is None:
                raise UserError(f"{source}: option 'loss_names' {short_repr(loss_names)} holds {short_repr(token)}, "
                                f"neither TAL (the one loss of RDE runs supported) nor one of the settings RDE spells "
                                f"into the name (sr, tau, margin or n, then a number)")
            key, value = _RDE_NAME_KEYS[match.group(1)], float(match.group(2))
            if key in found and found[key] != value:
                raise UserError(f"{source}: option 'loss_names' {short_repr(loss_names)} gives {key} twice "
                                f"({found[key]:g} and {value:g})")
            found[key] = value
    return found


def _number(value: Any) -> Optional[float]:
    """A config value as a float, None when it is not a number (the option's own check then names it)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def translate_config(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    return {**values, **translate_rde_config(values, source)}


register_layout(Layout(LAYOUT, detect=_detect, rules=RULES, translate_config=translate_config, method=METHOD,
                       priority=20))
