"""Image transforms (SPEC 2): resize to H x W, CLIP normalisation, and the training augmentation.

Random erasing runs after normalisation with value 0, which is exactly filling the erased box with the CLIP
mean colour (the SPEC's "filled with the mean"). The reference passed the mean itself as the value after
normalisation, i.e. a slightly different colour; the difference is immaterial for training and ours matches the
stated intent.
"""
from __future__ import annotations

from typing import Sequence

import torchvision.transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = False, aug: bool = True) -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W].

    eval: resize, to tensor, normalise. train with `aug`: resize, horizontal flip (p=0.5), pad 10 and random
    crop back to size, normalise, random erasing (p=0.5, scale 0.02-0.4, mean colour). train without `aug`:
    resize, flip, normalise. All randomness comes from torch's global RNG, which the data set seeds per item.
    """
    h, w = int(img_size[0]), int(img_size[1])
    normalize = T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)
    if not is_train:
        return T.Compose([T.Resize((h, w)), T.ToTensor(), normalize])
    if not aug:
        return T.Compose([T.Resize((h, w)), T.RandomHorizontalFlip(0.5), T.ToTensor(), normalize])
    return T.Compose([
        T.Resize((h, w)),
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop((h, w)),
        T.ToTensor(),
        normalize,
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), value=0),
    ])
