"""Caption augmentations of the training data path, by registered name (the option `caption_augment`).

An augmentation works on one of two stages: on the caption's text before tokenisation (`stage="text"`:
`fn(caption, alternatives) -> caption`, `alternatives` the annotation's other texts of that caption, e.g.
`captions_bt`, its back-translation, when the file has them), or on its token ids (`stage="tokens"`: ids [L],
SOT ... EOT, zero padding, into others of the same length). It runs inside the item's forked, seeded RNG (datasets/image_text.py), so it draws from torch's
global generator and stays a function of (seed, epoch, index): any number of workers and a resumed run give the
same tokens. A plug-in registers its own:

    @register_caption_augment("my_aug")
    def my_aug(ids: torch.Tensor) -> torch.Tensor:
        ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from utils.errors import UserError, did_you_mean, short_repr
from utils.plugins import declare
from utils.schema import Option
from utils.tokenizer import MASK_ID

TokenAugment = Callable[[torch.Tensor], torch.Tensor]
TextAugment = Callable[[str, Mapping[str, str]], str]
STAGES = ("tokens", "text")


@dataclass(frozen=True)
class AugmentSpec:
    name: str
    fn: Optional[Callable]
    owner: str
    stage: str = "tokens"


CAPTION_AUGMENTS: Dict[str, AugmentSpec] = {}


def register_caption_augment(name: str, *, stage: str = "tokens", options: Sequence[Option] = ()):
    """Decorator for `fn(ids [L]) -> ids [L]` (stage 'tokens') or `fn(caption, alternatives) -> caption` (stage
    'text'); see the module docstring."""
    if stage not in STAGES:
        raise ValueError(f"caption augmentation {name!r}: stage must be one of {STAGES}, got {stage!r}")

    def decorator(fn):
        CAPTION_AUGMENTS[name] = AugmentSpec(name, fn, declare(CAPTION_AUGMENTS, "caption augmentation", name,
                                                               fn.__module__, options), stage)
        return fn
    return decorator


CAPTION_AUGMENTS["none"] = AugmentSpec("none", None, __name__)


def caption_augment(name: str) -> Tuple[Optional[TextAugment], Optional[TokenAugment]]:
    """(text-stage function, token-stage function) of a registered augmentation, None for the stage it does not
    work on (both for 'none'); an unknown name is one line."""
    spec = CAPTION_AUGMENTS.get(name)
    if spec is None:
        raise UserError(f"config: unknown caption_augment {short_repr(name)}{did_you_mean(name, CAPTION_AUGMENTS)} "
                        f"(registered: {', '.join(CAPTION_AUGMENTS)}; a plug-in's own must be listed in "
                        f"custom_imports)")
    return (spec.fn, None) if spec.stage == "text" else (None, spec.fn)


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


@register_caption_augment("tbps", stage="text")
def tbps_text(caption: str, alternatives: Mapping[str, str], back_translation: float = 0.1,
              deletion: float = 0.05) -> str:
    """TBPS-CLIP's text recipe (SPEC 13): with probability 0.1 the caption's back-translation (`captions_bt`) when
    the annotation has one, then EDA's random deletion: each word dropped with probability 0.05 (`eda_alpha`); a
    one-word caption stays, and when every word is dropped one of them, drawn at random, is kept."""
    bt = alternatives.get("captions_bt")
    if torch.rand(()) < back_translation and bt:
        caption = bt
    words = caption.split()
    if len(words) <= 1:
        return caption
    kept = [w for w, r in zip(words, torch.rand(len(words)).tolist()) if r > deletion]
    return " ".join(kept) if kept else words[int(torch.randint(len(words), ()))]
