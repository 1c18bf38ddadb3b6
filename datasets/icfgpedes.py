"""ICFG-PEDES: `<root>/ICFG-PEDES/imgs/{train,test}/...` and `ICFG-PEDES.json` (some copies: `ICFG_PEDES.json`).

The file has only train and test splits; `val_holdout_ids` turns the last training identities into a val split.
"""
from __future__ import annotations

from datasets.base import AnnotationFormat
from datasets.registry import register_format

FORMAT = AnnotationFormat(name="ICFG-PEDES", folder="ICFG-PEDES",
                          annotation_files=("ICFG-PEDES.json", "ICFG_PEDES.json"), path_key="file_path")


register_format(FORMAT)
