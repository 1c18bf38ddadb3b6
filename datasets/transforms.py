"""Image transforms by recipe (the option `image_recipe`), and the extra training views that losses may ask for.

A recipe gives `load` (PIL image -> resized uint8 tensor [3, H, W], deterministic, so `cache_images` can keep its
result) and `finish` (that tensor -> the normalised float tensor, with training's random augmentation). All
randomness comes from torch's global RNG, which the data set seeds per item (datasets/image_text.py).

- `clip` (IRRA, PHP, RDE; SPEC 2): resize to H x W, CLIP normalisation; training: flip, pad 10 and random crop,
  random erasing. Random erasing runs after normalisation with value 0, which is exactly filling the erased box
  with the CLIP mean colour (the SPEC's "filled with the mean"). The reference passed the mean itself as the value
  after normalisation, a slightly different colour; ours matches the stated intent.
- `tbps` (TBPS-CLIP, SPEC 13): ImageNet normalisation; training: two augmentations drawn with replacement from a
  pool of six, on the float image before normalisation; evaluation resizes bicubic (antialiased).

Views (`VIEWS`, by name; a loss lists those it needs, `register_loss(views=...)`, and only those are made): `mvs`
is a second draw of the recipe's training augmentation; `ss_1` and `ss_2` are SimCLR views (TBPS-CLIP's SS loss).
A view starts from what `load` gives, so it is cached with the image: the reference cuts its SimCLR views from the
original image instead of the resized one, so their crops' aspect ratios differ from ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """The transforms of one recipe at one image size (see the module docstring)."""

    train_load: T.Compose
    train: Transform
    eval_load: T.Compose
    eval: Transform
    size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def _to_float(mean, std) -> list:
    return [T.ConvertImageDtype(torch.float32), T.Normalize(mean=mean, std=std)]


def clip_recipe(h: int, w: int, aug: bool) -> Recipe:
    load = T.Compose([T.Resize((h, w)), T.PILToTensor()])
    to_float = _to_float(CLIP_MEAN, CLIP_STD)
    if aug:
        train = T.Compose([T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop((h, w)), *to_float,
                           T.RandomErasing(p=0.5, scale=(0.02, 0.4), value=0)])
    else:
        train = T.Compose([T.RandomHorizontalFlip(0.5), *to_float])
    return Recipe(load, train, load, T.Compose(to_float), (h, w), CLIP_MEAN, CLIP_STD)


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


def tbps_recipe(h: int, w: int, aug: bool) -> Recipe:
    load = T.Compose([T.Resize((h, w)), T.PILToTensor()])
    eval_load = T.Compose([T.Resize((h, w), interpolation=InterpolationMode.BICUBIC, antialias=True), T.PILToTensor()])
    convert, normalize = _to_float(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([convert, DrawTwo(tbps_pool(h, w)), normalize] if aug else [convert, normalize])
    return Recipe(load, train, eval_load, T.Compose([convert, normalize]), (h, w), IMAGENET_MEAN, IMAGENET_STD)


RECIPES: Dict[str, Callable[[int, int, bool], Recipe]] = {"clip": clip_recipe, "tbps": tbps_recipe}


def recipe(name: str, img_size: Sequence[int], aug: bool = True) -> Recipe:
    """The recipe `name` at `img_size` (H, W); `aug` off keeps only the flip (clip) or nothing (tbps)."""
    return RECIPES[name](int(img_size[0]), int(img_size[1]), aug)


def simclr_view(r: Recipe) -> Transform:
    """A SimCLR-style view (TBPS-CLIP's SS): crop scale 0.2-1, strong colour jitter (p 0.8), grey (p 0.2), Gaussian
    blur with sigma in [0.1, 2] (p 0.5), flip; normalised as the recipe normalises."""
    h, w = r.size
    kernel = max(3, (min(h, w) // 10) | 1)  # SimCLR's 10% of the image side, odd
    return T.Compose([T.ConvertImageDtype(torch.float32), T.RandomResizedCrop((h, w), scale=(0.2, 1.0)),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5), T.RandomHorizontalFlip(),
                      T.Normalize(mean=r.mean, std=r.std)])


# name -> (the recipe -> the view's transform of what `load` gives)
VIEWS: Dict[str, Callable[[Recipe], Transform]] = {"mvs": lambda r: r.train, "ss_1": simclr_view,
                                                   "ss_2": simclr_view}


def register_view(name: str):
    """Decorator for `fn(recipe) -> transform`: a view a plug-in's loss may ask for by `name`."""
    def decorator(fn):
        VIEWS[name] = fn
        return fn
    return decorator


def image_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = False, aug: bool = True,
                     image_recipe: str = "clip") -> Tuple[T.Compose, Transform]:
    """(load, finish) of a recipe: finish(load(img)) is build_transforms(...)(img), value for value."""
    r = recipe(image_recipe, img_size, aug)
    return (r.train_load, r.train) if is_train else (r.eval_load, r.eval)


def build_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = False, aug: bool = True,
                     image_recipe: str = "clip") -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W]: `load` then `finish` of image_transforms."""
    load, finish = image_transforms(img_size, is_train, aug, image_recipe)
    return T.Compose([load, finish])
