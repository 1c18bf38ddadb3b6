"""Image transforms (SPEC 2): resize to H x W, CLIP normalisation, and the training augmentation.

Random erasing runs after normalisation with value 0, which is exactly filling the erased box with the CLIP
mean colour (the SPEC's "filled with the mean"). The reference passed the mean itself as the value after
normalisation, i.e. a slightly different colour; the difference is immaterial for training and ours matches the
stated intent.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torchvision.transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = False,
                     aug: bool = True) -> Tuple[T.Compose, T.Compose]:
    """(load, finish): `load` turns a PIL image into a resized uint8 tensor [3, H, W] and is deterministic, so
    its result can be cached (`cache_images`); `finish` makes the normalised float tensor, with the random
    augmentation of training. finish(load(img)) is build_transforms(...)(img), value for value.

    eval: resize, normalise. train with `aug`: resize, horizontal flip (p=0.5), pad 10 and random crop back to
    size, normalise, random erasing (p=0.5, scale 0.02-0.4, mean colour). train without `aug`: resize, flip,
    normalise. All randomness comes from torch's global RNG, which the data set seeds per item.
    """
    h, w = int(img_size[0]), int(img_size[1])
    load = T.Compose([T.Resize((h, w)), T.PILToTensor()])
    to_float = [T.ConvertImageDtype(torch.float32), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if not is_train:
        return load, T.Compose(to_float)
    if not aug:
        return load, T.Compose([T.RandomHorizontalFlip(0.5), *to_float])
    return load, T.Compose([
        T.RandomHorizontalFlip(0.5),
        T.Pad(10),
        T.RandomCrop((h, w)),
        *to_float,
        T.RandomErasing(p=0.5, scale=(0.02, 0.4), value=0),
    ])


def build_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = False, aug: bool = True) -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W]: `load` then `finish` of image_transforms."""
    load, finish = image_transforms(img_size, is_train, aug)
    return T.Compose([*load.transforms, *finish.transforms])
