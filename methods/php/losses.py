"""PHP's loss beyond the shared ones: the EFP's mixture-of-experts load balancing (SPEC 5, 7), summed over both
modalities (the head hands each modality's term to the losses as `image_aux` / `text_aux`)."""
from __future__ import annotations

import torch

from model.registry import register_loss
from utils.schema import Option


def _needs_efp(cfg):
    if "efp" in cfg.php_modules:
        return None
    return f"loss 'aux' needs the EFP (php_modules 'efp' or 'crfm+efp'); php_modules is {cfg.php_modules!r}"


@register_loss("aux", weight="aux_factor", needs=("php",), check=_needs_efp,
               options=[Option("aux_factor", float, 3.0, "Weight of the MoE load-balancing loss.", minimum=0)])
def _aux(out, cfg) -> torch.Tensor:
    return out["image_aux"] + out["text_aux"]
