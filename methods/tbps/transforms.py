"""TBPS-CLIP's image recipe (`image_recipe: tbps`, SPEC 13) and its SimCLR views (`ss_1`, `ss_2`, for the SS loss).

The recipe: ImageNet normalisation; training: two augmentations drawn with replacement from a pool of six, on the
float image before normalisation; evaluation resizes bicubic (antialiased). The views start from what the recipe's
`load` gives, so they are cached with the image: the reference cuts its SimCLR views from the original image
instead of the resized one, so their crops' aspect ratios differ from ours.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

from datasets.transforms import Recipe, Transform, register_image_recipe, register_view, to_float

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DrawTwo:
    """Two transforms drawn with replacement from `pool`, applied in the order drawn (TBPS-CLIP's `Choose`)."""

    def __init__(self, pool: Sequence[Transform]):
        self.pool = list(pool)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for i in torch.randint(len(self.pool), (2,)).tolist():
            x = self.pool[i](x)
        return x


def tbps_pool(h: int, w: int) -> list:
    """TBPS-CLIP's augmentation pool (SPEC 13), for float images in [0, 1] (RandomGrayscale's p is 0.1, random
    erasing's 0.5, torchvision's defaults, as in the reference)."""
    return [T.ColorJitter(0.1, 0.1, 0.1, 0), T.RandomRotation(15), T.RandomResizedCrop((h, w), (0.9, 1.0)),
            T.RandomGrayscale(), T.RandomHorizontalFlip(), T.RandomErasing(scale=(0.10, 0.20))]


@register_image_recipe("tbps")
def tbps_recipe(h: int, w: int, aug: bool) -> Recipe:
    load = T.Compose([T.Resize((h, w)), T.PILToTensor()])
    eval_load = T.Compose([T.Resize((h, w), interpolation=InterpolationMode.BICUBIC, antialias=True), T.PILToTensor()])
    convert, normalize = to_float(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([convert, DrawTwo(tbps_pool(h, w)), normalize] if aug else [convert, normalize])
    return Recipe(load, train, eval_load, T.Compose([convert, normalize]), (h, w), IMAGENET_MEAN, IMAGENET_STD)


@register_view("ss_1")
@register_view("ss_2")
def simclr_view(r: Recipe) -> Transform:
    """A SimCLR-style view (TBPS-CLIP's SS): crop scale 0.2-1, strong colour jitter (p 0.8), grey (p 0.2), Gaussian
    blur with sigma in [0.1, 2] (p 0.5), flip; normalised as the recipe normalises."""
    h, w = r.size
    kernel = max(3, (min(h, w) // 10) | 1)  # SimCLR's 10% of the image side, odd
    return T.Compose([T.ConvertImageDtype(torch.float32), T.RandomResizedCrop((h, w), scale=(0.2, 1.0)),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5), T.RandomHorizontalFlip(),
                      T.Normalize(mean=r.mean, std=r.std)])
