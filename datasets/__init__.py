"""Data sets (CUHK-PEDES, ICFG-PEDES, RSTPReid, Demo-PEDES, custom, plug-ins'), their torch Datasets, samplers and
loaders. Importing the package registers the built-in data sets."""
from datasets import cuhkpedes, custom, demo, icfgpedes, rstpreid  # noqa: F401 - they register themselves
from datasets.base import Annotations, PedesDataset
from datasets.registry import DATASETS, dataset_from_config, found_under, register_dataset

__all__ = ["Annotations", "DATASETS", "PedesDataset", "dataset_from_config", "found_under",
           "register_dataset"]
