"""IRRA's masked-language-model inputs (SPEC 3): the token inputs `mlm_ids` / `mlm_labels` of every training caption,
made in the item's seeded RNG while the loss `mlm` is on (datasets/augment.py, token inputs)."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch

from datasets.augment import register_token_inputs
from utils.config import check_options, register_rule
from utils.errors import UserError
from utils.schema import Option
from utils.tokenizer import MASK_ID

OPTIONS = [Option("masked_token_rate", float, 0.8, "Share of chosen MLM tokens replaced by <|mask|>.", minimum=0),
           Option("masked_token_unchanged_rate", float, 0.1, "Share of chosen MLM tokens left unchanged.",
                  minimum=0)]


def mask_tokens(ids: torch.Tensor, generator: Optional[torch.Generator] = None, mask_rate: float = 0.15,
                replace_mask: float = 0.8, replace_random: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLM inputs and labels for one token sequence (SPEC 3).

    Ordinary tokens (0 < id < MASK_ID; SOT/EOT/padding never) are chosen with probability `mask_rate`; a chosen
    token becomes MASK (`replace_mask`), a random id in [1, MASK_ID) (`replace_random`) or stays. Labels hold the
    original id at chosen positions and 0 elsewhere. If nothing was chosen, position 1 is masked.
    """
    ids = ids.long()
    n = ids.shape[0]
    chosen_draw = torch.rand(n, generator=generator)
    kind_draw = torch.rand(n, generator=generator)
    random_ids = torch.randint(1, MASK_ID, (n,), generator=generator)
    candidate = (ids > 0) & (ids < MASK_ID)
    chosen = candidate & (chosen_draw < mask_rate)
    to_mask = chosen & (kind_draw < replace_mask)
    to_random = chosen & (kind_draw >= replace_mask) & (kind_draw < replace_mask + replace_random)
    mlm_ids = torch.where(to_mask, torch.full_like(ids, MASK_ID), ids)
    mlm_ids = torch.where(to_random, random_ids, mlm_ids)
    labels = torch.where(chosen, ids, torch.zeros_like(ids))
    if not bool(chosen.any()) and n > 1:
        labels[1] = ids[1]
        mlm_ids[1] = MASK_ID
    return mlm_ids, labels


def masked_inputs(ids: torch.Tensor, replace_mask: float, replace_random: float) -> Dict[str, torch.Tensor]:
    mlm_ids, labels = mask_tokens(ids, replace_mask=replace_mask, replace_random=replace_random)
    return {"mlm_ids": mlm_ids, "mlm_labels": labels}


def mlm_rates(masked_token_rate: float, masked_token_unchanged_rate: float) -> Dict[str, float]:
    """mask_tokens' replacement rates from the config's MLM rates (the rest are random replacements)."""
    check_options({"masked_token_rate": masked_token_rate, "masked_token_unchanged_rate": masked_token_unchanged_rate})
    replace_random = 1.0 - masked_token_rate - masked_token_unchanged_rate
    return {"replace_mask": masked_token_rate, "replace_random": max(replace_random, 0.0)}


def _rates_within_one(get, source):
    if get("masked_token_rate") + get("masked_token_unchanged_rate") > 1 + 1e-9:
        raise UserError(f"{source}: masked_token_rate ({get('masked_token_rate')}) and masked_token_unchanged_rate "
                        f"({get('masked_token_unchanged_rate')}) must sum to at most 1")


register_rule(("masked_token_rate", "masked_token_unchanged_rate"), _rates_within_one)


@register_token_inputs("mlm", enabled=lambda cfg: "mlm" in cfg.losses, options=OPTIONS)
def mlm_inputs(cfg) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    return functools.partial(masked_inputs, **mlm_rates(cfg.masked_token_rate, cfg.masked_token_unchanged_rate))
