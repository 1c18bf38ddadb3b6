"""Caption augmentations of the training data path, by registered name (the option `caption_augment`).

An augmentation transforms one training caption's token ids [L] (SOT ... EOT, zero padding) into others of the
same length. It runs inside the item's forked, seeded RNG (datasets/image_text.py), so it draws from torch's
global generator and stays a function of (seed, epoch, index): any number of workers and a resumed run give the
same tokens. A plug-in registers its own:

    @register_caption_augment("my_aug")
    def my_aug(ids: torch.Tensor) -> torch.Tensor:
        ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from utils.errors import UserError, did_you_mean, short_repr
from utils.plugins import declare
from utils.schema import Option
from utils.tokenizer import MASK_ID

TokenAugment = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AugmentSpec:
    name: str
    fn: Optional[TokenAugment]
    owner: str


CAPTION_AUGMENTS: Dict[str, AugmentSpec] = {}


def register_caption_augment(name: str, *, options: Sequence[Option] = ()):
    """Decorator for `fn(ids [L]) -> ids [L]`; see the module docstring."""
    def decorator(fn):
        CAPTION_AUGMENTS[name] = AugmentSpec(name, fn, declare(CAPTION_AUGMENTS, "caption augmentation", name,
                                                               fn.__module__, options))
        return fn
    return decorator


CAPTION_AUGMENTS["none"] = AugmentSpec("none", None, __name__)


def caption_augment(name: str) -> Optional[TokenAugment]:
    """The function of a registered augmentation (None for 'none'); an unknown name is one line."""
    spec = CAPTION_AUGMENTS.get(name)
    if spec is None:
        raise UserError(f"config: unknown caption_augment {short_repr(name)}{did_you_mean(name, CAPTION_AUGMENTS)} "
                        f"(registered: {', '.join(CAPTION_AUGMENTS)}; a plug-in's own must be listed in "
                        f"custom_imports)")
    return spec.fn


@register_caption_augment("rde")
def rde_tokens(ids: torch.Tensor, prob: float = 0.2) -> torch.Tensor:
    """RDE's `txt_aug` (SPEC 12): each token between SOT and EOT is, with probability 0.2, replaced by <|mask|>
    (60% of those), by a random token of [1, 49405) (20%), or deleted (20%); the caption is re-padded."""
    words = (ids > 0) & (ids < MASK_ID)
    draw = torch.rand(ids.shape)
    changed = words & (draw < prob)
    kind = draw / prob  # uniform in [0, 1) given `changed`
    out = ids.clone()
    out[changed & (kind < 0.6)] = MASK_ID
    random_ids = torch.randint(1, MASK_ID, ids.shape)
    swap = changed & (kind >= 0.6) & (kind < 0.8)
    out[swap] = random_ids[swap]
    kept = out[~(changed & (kind >= 0.8))]
    return torch.cat([kept, torch.zeros(ids.numel() - kept.numel(), dtype=ids.dtype)])
