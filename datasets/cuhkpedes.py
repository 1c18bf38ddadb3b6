"""CUHK-PEDES: `<root>/CUHK-PEDES/imgs/...` and `reid_raw.json` (splits train/val/test, ids from 1)."""
from __future__ import annotations

from datasets.base import AnnotationFormat
from datasets.registry import register_format

FORMAT = AnnotationFormat(name="CUHK-PEDES", folder="CUHK-PEDES", annotation_files=("reid_raw.json",),
                          path_key="file_path")


register_format(FORMAT)
