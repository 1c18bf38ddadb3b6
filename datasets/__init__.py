"""Data sets (CUHK-PEDES, ICFG-PEDES, RSTPReid, Demo-PEDES), their torch Datasets, samplers and loaders."""
from datasets.base import PedesDataset
from datasets.registry import DATASETS, build_dataset

__all__ = ["DATASETS", "PedesDataset", "build_dataset"]
