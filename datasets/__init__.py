"""Data sets (CUHK-PEDES, ICFG-PEDES, RSTPReid, Demo-PEDES), their torch Datasets, samplers and loaders."""
from datasets.base import PedesDataset
from datasets.registry import DATASETS, build_dataset, dataset_from_config

__all__ = ["DATASETS", "PedesDataset", "build_dataset", "dataset_from_config"]
