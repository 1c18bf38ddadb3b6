"""RDE's caption augmentation (`caption_augment: rde`, the reference's `txt_aug`), a token-stage one."""
from __future__ import annotations

import torch

from datasets.augment import register_caption_augment
from utils.tokenizer import MASK_ID

from . import AUGMENT


@register_caption_augment(AUGMENT)
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
