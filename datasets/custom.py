"""`dataset_name: custom`: one's own data with no code, from one annotation file (`annotation_file`).

The file is either
- a JSON list of entries as in CUHK-PEDES's reid_raw.json: {"file_path": ..., "id": ..., "captions": [...],
  "split": "train" | "val" | "test"}, one per image; or
- a CSV (.csv) with a header naming the columns `file_path`, `id`, `caption` and `split` (any order, other columns
  ignored), one row per caption; the rows of one image (same file_path) must agree on id and split.
Image paths are relative to the annotation file's folder, or absolute; they may lead out of that folder (`../`),
e.g. to share the images of another data set. Everything then gets the checks every data set gets
(datasets/base.py): each problem is one line naming the file and the entry or row. Beyond those: a column named
twice, an id that is not a plain decimal number, and one image written two ways are errors; exact duplicate rows
are dropped with a warning.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from typing import Dict, Iterable, List, Tuple

from datasets.base import PID_MAX, PID_MIN, Annotations, read_json_list
from datasets.registry import register_dataset
from utils.errors import UserError, short_repr

CSV_COLUMNS = ("file_path", "id", "caption", "split")
DECIMAL = re.compile(r"[+-]?[0-9]+")
logger = logging.getLogger("php")


@register_dataset("custom")
def custom_annotations(cfg) -> Annotations:
    path = cfg.annotation_file
    if not path:
        raise UserError("dataset_name custom needs --annotation_file FILE (a JSON list or a CSV of image path, "
                        "person id, caption and split; see docs/extending.md)")
    if not os.path.isfile(path):
        raise UserError(f"annotation_file {path} does not exist (expected a JSON list or a CSV of image path, "
                        f"person id, caption and split)")
    folder = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".csv"):
        entries = read_csv(path)
    else:
        entries = read_json_list(path)
        check_spellings([(f"entry {i} (counting from 0)", e.get("file_path")) for i, e in enumerate(entries)
                         if isinstance(e, dict) and isinstance(e.get("file_path"), str)], folder, path)
    return Annotations(entries, folder, path, folder)


def check_spellings(images: Iterable[Tuple[str, str]], folder: str, path: str) -> None:
    """One image written two ways (`imgs/x.jpg` and `./imgs/x.jpg`, or two links to one file) would be two gallery
    images; each (where, image path) is checked against the earlier ones."""
    seen: Dict[str, Tuple[str, str]] = {}
    for where, image in images:
        full = os.path.join(folder, image)
        keys = {os.path.normpath(full)}
        if os.path.exists(full):
            keys.add(os.path.realpath(full))
        for key in keys:
            other = seen.get(key)
            if other is not None and other[1] != image:
                raise UserError(f"{path}: {where}: image {short_repr(image)} is the file of {other[0]} written "
                                f"another way ({short_repr(other[1])}); write each image one way")
        for key in keys:
            seen.setdefault(key, (where, image))


def _header(reader, path: str) -> Dict[str, int]:
    """Column name -> index; a needed column named twice is ambiguous (which caption?), one missing is an error."""
    header = next(reader, None) or []
    columns: Dict[str, int] = {}
    for index, name in enumerate(header):
        name = name.strip()
        if name in CSV_COLUMNS and name in columns:
            raise UserError(f"{path}: the header names the column {name!r} twice (columns {columns[name] + 1} and "
                            f"{index + 1}); name each of {', '.join(CSV_COLUMNS)} once")
        columns.setdefault(name, index)
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: the header must name the columns {', '.join(CSV_COLUMNS)}; missing "
                        f"{', '.join(missing)} (header: {short_repr(header)})")
    return columns


def _person_id(text: str, where: str) -> int:
    # int() would also take ' 1_0 ' (10), so ids 1_23 and 12_3 would be one person.
    if not DECIMAL.fullmatch(text or ""):
        raise UserError(f"{where}: 'id' must be a decimal integer (digits only), got {short_repr(text)}")
    pid = int(text)
    if not PID_MIN <= pid <= PID_MAX:
        raise UserError(f"{where}: 'id' {short_repr(text)} does not fit a signed 64-bit integer; expected "
                        f"-2^63 <= id < 2^63")
    return pid


def read_csv(path: str) -> List[dict]:
    """The CSV's rows grouped by image into entries, in the order images first appear. A BOM (Excel's "CSV
    UTF-8") is read; exact duplicate rows are dropped with one warning that counts them."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            columns = _header(reader, path)
            rows = [(number, row) for number, row in enumerate(reader, start=2) if row]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a valid CSV file ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    return _entries(rows, columns, path)


def _entries(rows, columns: Dict[str, int], path: str) -> List[dict]:
    entries: Dict[str, dict] = {}
    seen, duplicates = set(), 0
    spellings = []
    for number, row in rows:
        where = f"{path}: row {number}"
        image, pid_text, caption, split = (row[columns[c]] if columns[c] < len(row) else "" for c in CSV_COLUMNS)
        if (image, pid_text, caption, split) in seen:
            duplicates += 1
            continue
        seen.add((image, pid_text, caption, split))
        pid = _person_id(pid_text, where)
        entry = entries.get(image)
        if entry is None:
            entry = entries[image] = {"file_path": image, "id": pid, "captions": [], "split": split}
            spellings.append((f"row {number}", image))
        if (entry["id"], entry["split"]) != (pid, split):
            raise UserError(f"{where}: image {short_repr(image)} has id {pid} and split {short_repr(split)} "
                            f"here but {entry['id']} and {short_repr(entry['split'])} in an earlier row")
        entry["captions"].append(caption)
    if duplicates:
        logger.warning("%s: %d exact duplicate row(s) ignored (each caption of an image counts once)", path,
                       duplicates)
    check_spellings(spellings, os.path.dirname(os.path.abspath(path)), path)
    return list(entries.values())
