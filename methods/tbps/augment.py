"""TBPS-CLIP's caption augmentation (`caption_augment: tbps`, a text-stage one), and the annotation field it reads:
`captions_bt`, each caption's back-translation."""
from __future__ import annotations

from typing import Mapping

import torch

from datasets.augment import register_caption_augment
from datasets.base import register_caption_field

register_caption_field("captions_bt", "back-translation")


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
