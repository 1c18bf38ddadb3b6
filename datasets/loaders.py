"""Batch collation and the training / evaluation DataLoaders built from the run config."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Subset

from datasets.augment import caption_augment, token_inputs
from datasets.base import PedesDataset
from datasets.image_text import ImageDataset, ImageTextDataset, PreloadedImages, TextDataset
from datasets.samplers import RandomIdentitySampler, ShuffleSampler
from datasets.transforms import VIEWS, build_transforms, recipe
from utils.errors import UserError

logger = logging.getLogger("php.data")


def collate(batch: List[Dict[str, object]]) -> Dict[str, object]:
    """Stack a list of item dicts: tensors are stacked, ints become a LongTensor, anything else a list."""
    out: Dict[str, object] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


def per_process_batch_size(cfg, world_size: int) -> int:
    """cfg.batch_size split over processes when its scope is 'global', else as given."""
    if getattr(cfg, "batch_size_scope", "global") != "global":
        return cfg.batch_size
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                        f"({world_size}) when batch_size_scope is 'global'")
    return cfg.batch_size // world_size


def build_train_loader(cfg, dataset: PedesDataset, rank: int = 0, world_size: int = 1,
                       views: Sequence[str] = ()) -> DataLoader:
    """The training DataLoader over `dataset.train` (augmented images, tokens, the token inputs the config enables,
    and the extra image `views` the losses ask for, datasets/transforms.VIEWS).

    The sampler follows `cfg.sampler`; both it and the data set are seeded from `cfg.seed` and the epoch, which
    `set_loader_epoch` sets before each epoch (workers are not persistent, so it takes effect).
    """
    if not dataset.train:
        raise UserError(f"{dataset.name}: the train split is empty")
    batch_size = per_process_batch_size(cfg, world_size)
    r = recipe(cfg.image_recipe, cfg.img_size, cfg.img_aug)
    images = None
    if cfg.cache_images:
        images = PreloadedImages([p[2] for p in dataset.train], r.train_load)
        logger.info("cache_images: %d training images preloaded (%.1f MB)", len(images.index), images.nbytes / 2**20)
        transform, view_of = r.train, (lambda fn: fn)
    else:
        transform, view_of = T.Compose([r.train_load, r.train]), (lambda fn: T.Compose([r.train_load, fn]))
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise UserError(f"config: the losses ask for the image view(s) {', '.join(unknown)}, which no module "
                        f"registered (registered: {', '.join(VIEWS)})")
    text_fn, token_fn = caption_augment(cfg.caption_augment)
    train_set = ImageTextDataset(dataset.train, transform, cfg.text_length, seed=cfg.seed, images=images,
                                 augment_caption=token_fn, augment_text=text_fn,
                                 alternatives=dataset.train_alternatives,
                                 views={v: view_of(VIEWS[v](r)) for v in views}, token_inputs=token_inputs(cfg))
    if cfg.sampler == "identity":
        sampler = RandomIdentitySampler([p[0] for p in dataset.train], batch_size, cfg.num_instance, cfg.seed,
                                        num_replicas=world_size, rank=rank)
    else:
        sampler = ShuffleSampler(len(train_set), cfg.seed, num_replicas=world_size, rank=rank)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=False, generator=_loader_generator(cfg.seed))
    if len(loader) == 0:
        # drop_last would make every epoch empty: the run would "finish" untrained and save that as its best.
        share = f" ({batch_size} per process, {world_size} processes)" if world_size > 1 else ""
        raise UserError(f"{dataset.name}: the training split gives no full batch: {len(sampler)} samples "
                        f"{'per process ' if world_size > 1 else ''}for batch_size {cfg.batch_size}{share}; "
                        f"lower --batch_size")
    return loader


def full_pass_loader(cfg, train_set: ImageTextDataset, epoch: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over every training item (this process's share): the items of `epoch` as training gets them
    (augmentation included, with their `indices`), in a seeded order of their own, the last batch kept. For
    per-epoch callbacks that look at the whole training set (RDE's sample selection)."""
    train_set.set_epoch(epoch)
    # A seed apart from the training order's: the pass sees other batch mates than the epoch will.
    sampler = ShuffleSampler(len(train_set), 2 * cfg.seed + 1, num_replicas=world_size, rank=rank)
    sampler.set_epoch(epoch)
    return DataLoader(train_set, batch_size=per_process_batch_size(cfg, world_size), sampler=sampler,
                      num_workers=cfg.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      drop_last=False, persistent_workers=False, generator=_loader_generator(cfg.seed))


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Point the training loader's data set (augmentation, masking) and sampler (order) at `epoch`."""
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                order: Optional[Sequence[int]] = None) -> DataLoader:
    """The evaluation DataLoader over `dataset`: never shuffled, in file order or in `order` (indices into it).
    Validation, test.py, the audit's batchings and the gallery cache all load through it."""
    if order is not None:
        dataset = Subset(dataset, list(order))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def image_loader(img_paths: Sequence[str], img_size: Sequence[int], batch_size: int, num_workers: int = 0,
                 pids: Optional[Sequence[int]] = None, order: Optional[Sequence[int]] = None,
                 image_recipe: str = "clip") -> DataLoader:
    """Evaluation images (the recipe's eval transform) with their pids (0 when unknown)."""
    images = ImageDataset(list(pids) if pids is not None else [0] * len(img_paths), list(img_paths),
                          build_transforms(img_size, is_train=False, image_recipe=image_recipe))
    return eval_loader(images, batch_size, num_workers, order)


def build_eval_loaders(cfg, split: Dict[str, list], batch_size: Optional[int] = None,
                       orders: Tuple[Optional[Sequence[int]], Optional[Sequence[int]]] = (None, None)
                       ) -> Tuple[DataLoader, DataLoader]:
    """(image loader, text loader) over an evaluation split with the eval transform, at `batch_size` (default
    test_batch_size), each in file order or in its `orders` entry."""
    batch_size = batch_size or cfg.test_batch_size
    texts = TextDataset(split["caption_pids"], split["captions"], cfg.text_length)
    return (image_loader(split["img_paths"], cfg.img_size, batch_size, cfg.num_workers, split["image_pids"],
                         orders[0], cfg.image_recipe),
            eval_loader(texts, batch_size, cfg.num_workers, orders[1]))


def _loader_generator(seed: int) -> torch.Generator:
    # DataLoader draws its workers' base seed from this generator; giving it one keeps the global RNG untouched.
    g = torch.Generator()
    g.manual_seed(seed)
    return g
