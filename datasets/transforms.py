"""Image transforms by recipe (the option `image_recipe`), and the extra training views that losses may ask for.

A recipe gives `load` (PIL image -> resized uint8 tensor [3, H, W], deterministic, so `cache_images` can keep its
result) and `finish` (that tensor -> the normalised float tensor, with training's random augmentation). All
randomness comes from torch's global RNG, which the data set seeds per item (datasets/image_text.py).

- `clip` (IRRA, PHP, RDE; SPEC 2): resize to H x W, CLIP normalisation; training: flip, pad 10 and random crop,
  random erasing. Random erasing runs after normalisation with value 0, which is exactly filling the erased box
  with the CLIP mean colour (the SPEC's "filled with the mean"). The reference passed the mean itself as the value
  after normalisation, a slightly different colour; ours matches the stated intent.
A method registers its own recipe (`register_image_recipe`) and views (`register_view`).

Views (`VIEWS`, by name; a loss lists those it needs, `register_loss(views=...)`, and only those are made): `mvs`
is a second draw of the recipe's training augmentation. A view starts from what `load` gives, so it is cached with
the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
import torchvision.transforms as T

from utils.errors import UserError, did_you_mean, short_repr

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


def to_float(mean, std) -> list:
    """uint8 [3, H, W] -> normalised float32: the last steps of every recipe."""
    return [T.ConvertImageDtype(torch.float32), T.Normalize(mean=mean, std=std)]


def clip_recipe(h: int, w: int, aug: bool) -> Recipe:
    load = T.Compose([T.Resize((h, w)), T.PILToTensor()])
    floats = to_float(CLIP_MEAN, CLIP_STD)
    if aug:
        train = T.Compose([T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop((h, w)), *floats,
                           T.RandomErasing(p=0.5, scale=(0.02, 0.4), value=0)])
    else:
        train = T.Compose([T.RandomHorizontalFlip(0.5), *floats])
    return Recipe(load, train, load, T.Compose(floats), (h, w), CLIP_MEAN, CLIP_STD)


RECIPES: Dict[str, Callable[[int, int, bool], Recipe]] = {"clip": clip_recipe}


def register_image_recipe(name: str):
    """Decorator for `fn(h, w, aug) -> Recipe`: a recipe the option `image_recipe` may name."""
    def decorator(fn):
        RECIPES[name] = fn
        return fn
    return decorator


def recipe(name: str, img_size: Sequence[int], aug: bool = True) -> Recipe:
    """The recipe `name` at `img_size` (H, W); `aug` off keeps what the recipe keeps (clip: the flip)."""
    fn = RECIPES.get(name)
    if fn is None:
        raise UserError(f"config: unknown image_recipe {short_repr(name)}{did_you_mean(name, RECIPES)} (registered: "
                        f"{', '.join(RECIPES)})")
    return fn(int(img_size[0]), int(img_size[1]), aug)


# name -> (the recipe -> the view's transform of what `load` gives)
VIEWS: Dict[str, Callable[[Recipe], Transform]] = {"mvs": lambda r: r.train}


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
