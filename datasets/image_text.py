"""torch Datasets: training image-caption pairs (with the token inputs the losses need), and the evaluation images
and texts.

Reproducibility: every random choice of a training item (augmentation, token inputs) is a pure function of
(seed, epoch, index). Each item runs its transform and masking under a forked torch RNG seeded from those three
numbers, so items are identical for any number of workers and after a resume, and the global RNG (dropout,
initialisation) is left untouched.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.tokenizer import tokenize


def read_image(path: str) -> Image.Image:
    """Open an image as RGB; a file that cannot be opened or decoded raises UserError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index) so that neighbouring triples give unrelated streams."""
    state = np.random.SeedSequence([seed % 2**63, epoch % 2**63, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class _Captions:
    """Captions tokenised on first use, cached per caption index (per worker process)."""

    def __init__(self, captions: Sequence[str], text_length: int):
        self.captions = captions
        self.text_length = text_length
        self._cache: Dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> torch.Tensor:
        ids = self._cache.get(i)
        if ids is None:
            ids = tokenize(self.captions[i], self.text_length, truncate=True)[0]
            self._cache[i] = ids
        return ids

    def __getstate__(self):
        # The cache is rebuilt in each worker rather than pickled to it.
        return {"captions": self.captions, "text_length": self.text_length, "_cache": {}}


class PreloadedImages:
    """Each distinct image decoded and passed through `load` once, all held in one tensor (uint8 [N, 3, H, W]
    for image_transforms' `load`): worker processes forked later share its memory instead of copying it."""

    def __init__(self, paths: Sequence[str], load: Callable, threads: Optional[int] = None):
        unique = list(dict.fromkeys(paths))
        if not unique:
            raise ValueError("no images to preload")
        self.index = {path: i for i, path in enumerate(unique)}
        first = load(read_image(unique[0]))
        self.data = torch.empty((len(unique), *first.shape), dtype=first.dtype)
        self.data[0] = first

        def fill(i: int) -> None:
            self.data[i] = load(read_image(unique[i]))

        # PIL releases the GIL while decoding and resizing, so threads overlap the work.
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(fill, range(1, len(unique))))

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.data[self.index[path]]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class ImageTextDataset(Dataset):
    """Training pairs `(pid, image_id, img_path, caption)` -> dict of `pids`, `image_ids`, `indices` (the pair's
    position in the training set), `images`, `caption_ids`, what each of `token_inputs` adds (datasets/augment.py)
    and, with `views` ({name: transform}, what the losses ask for), `view_<name>` for each.

    Images are read from disk, or taken from `images` (PreloadedImages) when given; `transform` and the views
    apply to what either gives (a PIL image, or the preloaded tensor). Captions pass through `augment_text` (a
    text-stage augmentation of datasets/augment.py, given the pair's texts of each field of `alternatives`, {field:
    one text or None per pair}) before tokenisation, and through `augment_caption` (a token-stage one) after it.
    """

    def __init__(self, pairs: Sequence[Tuple[int, int, str, str]], transform: Optional[Callable] = None,
                 text_length: int = 77, seed: int = 0, images: Optional[PreloadedImages] = None,
                 augment_caption: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 augment_text: Optional[Callable[[str, Dict[str, str]], str]] = None,
                 alternatives: Optional[Dict[str, Sequence[Optional[str]]]] = None,
                 views: Optional[Dict[str, Callable]] = None,
                 token_inputs: Sequence[Callable[[torch.Tensor], Dict[str, torch.Tensor]]] = ()):
        self.pairs = pairs
        self.transform = transform
        self.images = images
        self.token_inputs = list(token_inputs)
        self.seed = seed
        self.epoch = 0
        self.augment_caption = augment_caption
        self.augment_text = augment_text
        self.alternatives = dict(alternatives or {})
        self.views = dict(views or {})
        self.text_length = text_length
        self.caption_ids = _Captions([p[3] for p in pairs], text_length)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random augmentation and masking the items use."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _caption(self, index: int) -> torch.Tensor:
        if self.augment_text is None:
            return self.caption_ids[index]
        others = {name: texts[index] for name, texts in self.alternatives.items() if texts[index]}
        text = self.augment_text(self.pairs[index][3], others)
        return tokenize(text, self.text_length, truncate=True)[0]

    def __getitem__(self, index: int) -> Dict[str, object]:
        pid, image_id, img_path, _ = self.pairs[index]
        img = read_image(img_path) if self.images is None else self.images[img_path]
        item: Dict[str, object] = {"pids": pid, "image_ids": image_id, "indices": index}
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed every accelerator's generator (which
            # fork_rng(devices=[]) does not restore, so dropout on a GPU would follow the last item's seed) and, where
            # none is initialised, queue that call with a formatted stack trace: 0.23 ms an item, 1.1 s a demo epoch
            # (benchmarks/README.md).
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, index))
            item["images"] = self.transform(img) if self.transform is not None else img
            caption_ids = self._caption(index)
            if self.augment_caption is not None:
                caption_ids = self.augment_caption(caption_ids)
            item["caption_ids"] = caption_ids
            for inputs in self.token_inputs:
                item.update(inputs(caption_ids))
            # Views come last, so that a run without them draws exactly what it drew before they existed.
            for name, view in self.views.items():
                item[f"view_{name}"] = view(img)
        return item


class ImageDataset(Dataset):
    """Evaluation gallery: -> dict of `pids`, `images` in file order."""

    def __init__(self, pids: Sequence[int], img_paths: Sequence[str], transform: Optional[Callable] = None):
        if len(pids) != len(img_paths):
            raise ValueError(f"{len(pids)} pids for {len(img_paths)} images")
        self.pids = pids
        self.img_paths = img_paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, index: int) -> Dict[str, object]:
        img = read_image(self.img_paths[index])
        return {"pids": self.pids[index], "images": self.transform(img) if self.transform is not None else img}


class TextDataset(Dataset):
    """Evaluation queries: -> dict of `pids`, `caption_ids` in file order."""

    def __init__(self, pids: Sequence[int], captions: Sequence[str], text_length: int = 77):
        if len(pids) != len(captions):
            raise ValueError(f"{len(pids)} pids for {len(captions)} captions")
        self.pids = pids
        self.caption_ids = _Captions(list(captions), text_length)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> Dict[str, object]:
        return {"pids": self.pids[index], "caption_ids": self.caption_ids[index]}
