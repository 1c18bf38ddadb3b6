"""`dataset_name: custom`: one's own data with no code, from one annotation file (`annotation_file`).

The file is either
- a JSON list of entries as in CUHK-PEDES's reid_raw.json: {"file_path": ..., "id": ..., "captions": [...],
  "split": "train" | "val" | "test"}, one per image; or
- a CSV (.csv) with a header naming the columns `file_path`, `id`, `caption` and `split` (any order, other columns
  ignored), one row per caption; the rows of one image (same file_path) must agree on id and split.
Image paths are relative to the annotation file's folder, or absolute. Everything then gets the checks every
data set gets (datasets/base.py): each problem is one line naming the file and the entry or row.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

from datasets.base import Annotations, read_json_list
from datasets.registry import register_dataset
from utils.errors import UserError, short_repr

CSV_COLUMNS = ("file_path", "id", "caption", "split")


@register_dataset("custom")
def custom_annotations(cfg) -> Annotations:
    path = cfg.annotation_file
    if not path:
        raise UserError("dataset_name custom needs --annotation_file FILE (a JSON list or a CSV of image path, "
                        "person id, caption and split; see docs/extending.md)")
    if not os.path.isfile(path):
        raise UserError(f"annotation_file {path} does not exist (expected a JSON list or a CSV of image path, "
                        f"person id, caption and split)")
    entries = read_csv(path) if path.lower().endswith(".csv") else read_json_list(path)
    folder = os.path.dirname(os.path.abspath(path))
    return Annotations(entries, folder, path, folder)


def read_csv(path: str) -> List[dict]:
    """The CSV's rows grouped by image into entries, in the order images first appear."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: the header must name the columns {', '.join(CSV_COLUMNS)}; missing "
                                f"{', '.join(missing)} (header: {short_repr(reader.fieldnames)})")
            entries: Dict[str, dict] = {}
            for row_number, row in enumerate(reader, start=2):
                where = f"{path}: row {row_number}"
                try:
                    pid = int(row["id"])
                except (TypeError, ValueError):
                    raise UserError(f"{where}: 'id' must be an integer, got {short_repr(row['id'])}") from None
                image, split = row["file_path"] or "", row["split"]
                entry = entries.setdefault(image, {"file_path": image, "id": pid, "captions": [], "split": split})
                if (entry["id"], entry["split"]) != (pid, split):
                    raise UserError(f"{where}: image {short_repr(image)} has id {pid} and split {short_repr(split)} "
                                    f"here but {entry['id']} and {short_repr(entry['split'])} in an earlier row")
                entry["captions"].append(row["caption"] if row["caption"] is not None else "")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a valid CSV file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    return list(entries.values())
