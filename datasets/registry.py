"""The registry of data sets, and `dataset_from_config`, the one function that builds a run's data set.

A data set registers a builder that reads its annotations; the checks and the splits are common to all
(datasets/base.py), so a plug-in's data set gets the same up-front checks and one-line errors as the built-in ones:

    @register_dataset("my_dataset", options=[Option("my_file", str, "", "Where my annotations are.")])
    def my_dataset(cfg) -> Annotations:
        return Annotations(entries=[{"id": 1, "file_path": "a.jpg", "captions": ["..."], "split": "train"}, ...],
                           image_dir="/data/mine", source="/data/mine/list.txt")

The built-in data sets register in their own files (cuhkpedes.py, icfgpedes.py, rstpreid.py, demo_pedes.py,
custom.py).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from datasets.base import (AnnotationFormat, Annotations, PedesDataset, dataset_from_annotations, locate,
                           read_annotation_file)
from utils.errors import UserError, did_you_mean, short_repr
from utils.plugins import declare, load_methods
from utils.schema import Option


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    annotations: Callable[[Any], Annotations]
    owner: str
    layout: Optional[AnnotationFormat] = None  # a folder under root_dir (the built-in sets): how to find it


def found_under(root_dir: str) -> List[str]:
    """The registered data sets whose folder and annotation file exist under `root_dir` (nothing is generated)."""
    found = []
    for name, spec in DATASETS.items():
        if spec.layout is None:
            continue
        try:
            locate(spec.layout, root_dir)
        except UserError:
            continue
        found.append(name)
    return found


DATASETS: Dict[str, DatasetSpec] = {}
_GENERATE = contextvars.ContextVar("generate_datasets", default=False)


def register_dataset(name: str, *, options: Sequence[Option] = (), layout: Optional[AnnotationFormat] = None):
    """Decorator for `annotations(cfg) -> Annotations`; see the module docstring."""
    def decorator(fn):
        DATASETS[name] = DatasetSpec(name, fn, declare(DATASETS, "data set", name, fn.__module__, options), layout)
        return fn
    return decorator


def register_format(fmt: AnnotationFormat) -> None:
    """Register a data set that lives in `<root_dir>/<fmt.folder>/` with its annotation file and imgs/."""
    register_dataset(fmt.name, layout=fmt)(lambda cfg: read_annotation_file(fmt, cfg.root_dir))


def may_generate() -> bool:
    """Whether the data set being built may be generated where it is missing (Demo-PEDES): in training only."""
    return _GENERATE.get()


def dataset_from_config(cfg, check_images: bool = True, generate: bool = False) -> PedesDataset:
    """The data set a run's config names, checked up front: the one function every entry point builds data with.

    Reads `dataset_name` and what its builder reads (`root_dir`, `demo_seed`, `annotation_file`, a plug-in's
    options), then `val_holdout_ids` and `skip_missing_images`; `check_images=False` skips the image existence
    check (for callers that check the images they use). Only with `generate` (training) may a generated data set
    (Demo-PEDES) be written where it is missing; evaluating, serving and checking never write a data set.
    """
    load_methods()  # the caption fields the methods register are read with the entries
    spec = DATASETS.get(cfg.dataset_name)
    if spec is None:
        raise UserError(f"unknown data set {short_repr(cfg.dataset_name)}{did_you_mean(cfg.dataset_name, DATASETS)}; expected one of "
                        f"{', '.join(DATASETS)} (a plug-in's own must be listed in custom_imports)")
    token = _GENERATE.set(generate)
    try:
        annotations = spec.annotations(cfg)
    finally:
        _GENERATE.reset(token)
    return dataset_from_annotations(cfg.dataset_name, annotations, val_holdout_ids=cfg.val_holdout_ids,
                                    skip_missing_images=cfg.skip_missing_images, check_images=check_images)
