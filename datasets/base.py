"""Loading and checking of the annotation files, and the data set object every format ends up as.

All checks run up front, before any training, and each failure is one `UserError` line that names the file,
entry, key or path at fault. Image existence is checked by listing each image folder once (`os.scandir`), which
keeps the check of ~40k CUHK-PEDES images well under a second.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from prettytable import PrettyTable

from utils.errors import UserError, short_repr
from utils.files import reading

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TrainPair = Tuple[int, int, str, str]  # (pid, image_id, img_path, caption)
# Ids end up in int64 tensors (collate, evaluation); a larger one would overflow there, far from the file.
PID_MIN, PID_MAX = -2 ** 63, 2 ** 63 - 1


@dataclass(frozen=True)
class AnnotationFormat:
    """How one data set lays out its folder and annotation file."""

    name: str                          # data set name, e.g. "CUHK-PEDES"
    folder: str                        # folder under the data root
    annotation_files: Tuple[str, ...]  # accepted annotation file names; the first is the canonical one
    path_key: str                      # entry key holding the image path relative to imgs/
    splits: Tuple[str, ...] = SPLITS   # split values allowed in the file

    def expected_layout(self, root_dir: str) -> str:
        base = os.path.join(root_dir, self.folder)
        names = " (or ".join(self.annotation_files) + ")" * (len(self.annotation_files) - 1)
        return f"expected {os.path.join(base, 'imgs')}{os.sep} and {os.path.join(base, names)}"


@dataclass
class Annotations:
    """A data set as its source describes it, before any check: what a data set's builder returns.

    `entries` are mappings in the CUHK-PEDES form: {"id": int, <path_key>: image path relative to `image_dir` (or
    absolute), "captions": [str, ...], "split": one of `splits`}. `source` names them in messages (the file read).
    """

    entries: list
    image_dir: str
    source: str
    dataset_dir: str = ""
    path_key: str = "file_path"
    splits: Tuple[str, ...] = SPLITS


@dataclass(frozen=True)
class Entry:
    """One annotated image, as read from the file."""

    pid: int
    rel_path: str
    captions: Tuple[str, ...]
    split: str
    # {field: one text per caption} of the registered caption fields the entry has (CAPTION_FIELDS).
    alternatives: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


# Annotation fields that hold, beside `captions`, another text of each caption (one per caption, in order), which a
# text-stage caption augmentation may use (datasets/augment.py): {field name: what one text is}. A method registers
# the fields its augmentation reads; data sets read every registered field an entry has, checked.
CAPTION_FIELDS: Dict[str, str] = {}


def register_caption_field(name: str, what: str) -> None:
    """Let annotation entries hold `name`: a list of one `what` (e.g. "back-translation") per caption."""
    CAPTION_FIELDS[name] = what


def empty_split() -> Dict[str, list]:
    return {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": [], "caption_img_index": []}


class PedesDataset:
    """A parsed data set: training pairs and the evaluation splits.

    `train` holds `(pid, image_id, img_path, caption)` tuples with pids contiguous from 0 (ordered by original id)
    and image ids contiguous per image; `train_id_map[pid]` is the original id. `val` and `test` are dicts of
    lists: `image_pids`, `img_paths` (the gallery) and `caption_pids`, `captions` (the queries), with the
    original ids as pids, and `caption_img_index` (the position in `img_paths` of each caption's own image).
    """

    def __init__(self, name: str, dataset_dir: str, train: List[TrainPair], val: Dict[str, list],
                 test: Dict[str, list], train_id_map: Dict[int, int], annotation_file: Optional[str] = None):
        self.name = name
        self.annotation_file = annotation_file  # the file the annotations came from, when they came from one
        self.dataset_dir = dataset_dir
        self.train = train
        self.val = val
        self.test = test
        self.train_id_map = train_id_map
        self.num_classes = len(train_id_map)
        # {caption field: each training pair's text of it (None where its entry has none)}, for the fields that
        # some training entry has (CAPTION_FIELDS).
        self.train_alternatives: Dict[str, List[Optional[str]]] = {}

    def split(self, name: str, hint: str = "") -> Dict[str, list]:
        """The evaluation split `name` ('val' or 'test'); one that holds no caption is a UserError (with `hint`)."""
        split = getattr(self, name)
        if not split["captions"]:
            where = self.annotation_file or self.dataset_dir
            raise UserError(f"{self.name} has no {name} split (in {where}){': ' + hint if hint else ''}")
        return split

    def statistics(self) -> Dict[str, Tuple[int, int, int]]:
        """(identities, images, captions) per split."""
        stats = {"train": (self.num_classes, len({p[1] for p in self.train}), len(self.train))}
        for split, d in (("val", self.val), ("test", self.test)):
            stats[split] = (len(set(d["image_pids"])), len(d["img_paths"]), len(d["captions"]))
        return stats

    def summary(self) -> PrettyTable:
        """A table with rows train/val/test and columns ids, images, captions."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.title = self.name
        for split, (ids, images, captions) in self.statistics().items():
            table.add_row([split, ids, images, captions])
        return table


def locate(fmt: AnnotationFormat, root_dir: str) -> Tuple[str, str]:
    """Check the folder layout; return (dataset_dir, annotation file path)."""
    layout = fmt.expected_layout(root_dir)
    dataset_dir = os.path.join(root_dir, fmt.folder)
    if not os.path.isdir(root_dir):
        raise UserError(f"data root {root_dir} does not exist or is not a folder; {layout}")
    if not os.path.isdir(dataset_dir):
        raise UserError(f"data set folder {dataset_dir} does not exist; {layout}")
    if not os.path.isdir(os.path.join(dataset_dir, "imgs")):
        raise UserError(f"image folder {os.path.join(dataset_dir, 'imgs')} does not exist; {layout}")
    for name in fmt.annotation_files:
        path = os.path.join(dataset_dir, name)
        if os.path.isfile(path):
            return dataset_dir, path
    raise UserError(f"annotation file {os.path.join(dataset_dir, fmt.annotation_files[0])} does not exist; "
                    f"{layout}")


def read_json_list(path: str) -> list:
    """Parse a JSON file that must hold a list; errors name the file (and line/column for syntax errors)."""
    try:
        with reading(path, "JSON"), open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # valid syntax the parser still refuses, e.g. an integer of over 4300 digits
        raise UserError(f"{path}: not usable JSON: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of entries (one per image), got a {_json_type(data)}")
    return data


def _json_type(value) -> str:
    names = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_entries(data: list, path: str, fmt) -> List[Entry]:
    """Check every entry's keys and types; return them as `Entry` objects in file order."""
    needed = ("id", fmt.path_key, "captions", "split")
    path_key, splits = fmt.path_key, fmt.splits
    entries = []
    for i, item in enumerate(data):
        try:
            pid, rel, captions, split = item["id"], item[path_key], item["captions"], item["split"]
        except (TypeError, KeyError):
            _raise_shape_error(item, f"{path}: entry {i} (counting from 0)", needed)
        # One combined test keeps the common, valid case fast (CUHK-PEDES has 40k entries); the slow path says why.
        if type(pid) is not int or not PID_MIN <= pid <= PID_MAX or type(rel) is not str or not rel \
                or type(captions) is not list or split not in splits \
                or not all(type(c) is str and c and not c.isspace() for c in captions) or not _is_text(captions):
            _raise_value_error(pid, rel, captions, split, f"{path}: entry {i} (counting from 0)", fmt)
        alternatives = {name: _alternative(item, name, captions, path, i) for name in CAPTION_FIELDS
                        if item.get(name) is not None}
        entries.append(Entry(pid, rel, tuple(captions), split, alternatives))
    return entries


def _alternative(item: dict, name: str, captions: list, path: str, i: int) -> Tuple[str, ...]:
    """The entry's caption field `name`, one text per caption, checked."""
    texts, what = item[name], CAPTION_FIELDS[name]
    if type(texts) is not list or len(texts) != len(captions) or not all(type(c) is str for c in texts):
        got = (f"a list of {len(texts)}" if type(texts) is list and all(type(c) is str for c in texts)
               else _describe_list(texts))
        raise UserError(f"{path}: entry {i} (counting from 0): '{name}' must be a list of {len(captions)} "
                        f"string(s), one {what} per caption, got {got}")
    if not _is_text(texts):  # one encoding for the common case; only a bad entry looks for the text at fault
        broken = next(k for k, c in enumerate(texts) if not _is_text([c]))
        raise UserError(f"{path}: entry {i} (counting from 0): '{name}' text {broken} (counting from 0), the "
                        f"{what} of caption {broken}, holds a lone surrogate (e.g. \\ud800), which is not "
                        f"text; expected UTF-8 text")
    return tuple(texts)


def _is_text(captions: List[str]) -> bool:
    """Whether the captions are text (valid JSON may hold a lone UTF-16 surrogate such as \\ud800, which no text
    encoding can write: a page, a log or a JSON file showing it would fail far from the data)."""
    try:
        "".join(captions).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raise_shape_error(item, where: str, needed: Tuple[str, ...]) -> None:
    if not isinstance(item, dict):
        raise UserError(f"{where} is a {_json_type(item)}, expected a mapping with keys {', '.join(needed)}")
    missing = next(k for k in needed if k not in item)
    raise UserError(f"{where} lacks the key '{missing}' (needed: {', '.join(needed)})")


def _raise_value_error(pid, rel, captions, split, where: str, fmt) -> None:
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise UserError(f"{where}: 'id' must be an integer, got {_json_type(pid)} {short_repr(pid)}")
    if not PID_MIN <= pid <= PID_MAX:
        raise UserError(f"{where}: 'id' {short_repr(pid)} does not fit a signed 64-bit integer; expected "
                        f"-2^63 <= id < 2^63")
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{where}: '{fmt.path_key}' must be a non-empty string, got {_json_type(rel)} "
                        f"{short_repr(rel)}")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: 'captions' must be a list of strings, got {_describe_list(captions)}")
    broken = next((k for k, c in enumerate(captions) if not _is_text([c])), None)
    if broken is not None:
        raise UserError(f"{where}: caption {broken} (counting from 0) holds a lone surrogate (e.g. \\ud800), which is "
                        f"not text; expected UTF-8 text")
    blank = next((k for k, c in enumerate(captions) if not c or c.isspace()), None)
    if blank is not None:
        # Empty queries are all identical: evaluation would rank them as one and count the tie as retrieval.
        what = "empty" if not captions[blank] else "only white space"
        raise UserError(f"{where}: caption {blank} (counting from 0) is {what}; expected a description of the person")
    raise UserError(f"{where}: unknown split {short_repr(split)}; expected one of {', '.join(fmt.splits)}")


def _describe_list(value) -> str:
    if not isinstance(value, list):
        return f"a {_json_type(value)}"
    bad = next(c for c in value if not isinstance(c, str))
    return f"a list holding a {_json_type(bad)} ({short_repr(bad)})"


class DirectoryListing:
    """Answers 'is this a regular file' by listing each folder once (cached), not one stat per file.

    A link is followed: one to a file counts, a broken one or a loop does not.
    """

    def __init__(self) -> None:
        self._names: Dict[str, Set[str]] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        names = self._names.get(folder)
        if names is None:
            try:
                with os.scandir(folder or ".") as it:
                    names = {e.name for e in it if _is_file(e)}
            except OSError:
                names = set()
            self._names[folder] = names
        return name in names


def _is_file(entry: os.DirEntry) -> bool:
    # Judged per entry: one link loop (ELOOP) must not make the rest of its folder look missing.
    try:
        return entry.is_file()
    except OSError:
        return False


def drop_missing_images(entries: List[Entry], img_dir: str, ann_path: str, skip: bool) -> List[Entry]:
    """Raise (or, with `skip`, warn and drop) for entries whose image file is absent (see DirectoryListing)."""
    listing = DirectoryListing()
    missing = [e for e in entries if not listing.exists(os.path.join(img_dir, e.rel_path))]
    if not missing:
        return entries
    first = ", ".join(os.path.join(img_dir, e.rel_path) for e in missing[:3])
    more = ", ..." if len(missing) > 3 else ""
    if not skip:
        raise UserError(f"{len(missing)} image(s) listed in {ann_path} are missing (or are broken links): "
                        f"{first}{more}; restore them or pass --skip_missing_images true to drop them")
    message = f"dropping {len(missing)} image(s) listed in {ann_path} but missing: {first}{more}"
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
    gone = {id(e) for e in missing}
    return [e for e in entries if id(e) not in gone]


def build_splits(name: str, dataset_dir: str, entries: Sequence[Entry], val_holdout_ids: int = 0,
                 source: Optional[str] = None, img_dir: Optional[str] = None) -> PedesDataset:
    """Group entries by split, remap training ids, optionally hold out the last training identities as val.
    Image paths are relative to `img_dir` (default `<dataset_dir>/imgs`)."""
    img_dir = img_dir if img_dir is not None else os.path.join(dataset_dir, "imgs")
    by_split: Dict[str, List[Entry]] = {s: [] for s in SPLITS}
    for e in entries:
        by_split[e.split].append(e)
    if val_holdout_ids > 0:
        by_split["train"], by_split["val"] = _hold_out(by_split["train"], by_split["val"], val_holdout_ids,
                                                       source or name)

    train_ids = sorted({e.pid for e in by_split["train"]})
    label = {pid: i for i, pid in enumerate(train_ids)}
    train: List[TrainPair] = []
    fields = list(dict.fromkeys(name for e in by_split["train"] for name in e.alternatives))
    alternatives: Dict[str, List[Optional[str]]] = {name: [] for name in fields}
    for image_id, e in enumerate(by_split["train"]):
        path = os.path.join(img_dir, e.rel_path)
        train.extend((label[e.pid], image_id, path, c) for c in e.captions)
        for name in fields:
            alternatives[name].extend(e.alternatives.get(name) or [None] * len(e.captions))

    def eval_split(items: List[Entry]) -> Dict[str, list]:
        d = empty_split()
        for e in items:
            d["image_pids"].append(e.pid)
            d["img_paths"].append(os.path.join(img_dir, e.rel_path))
            d["caption_pids"].extend([e.pid] * len(e.captions))
            d["captions"].extend(e.captions)
            d["caption_img_index"].extend([len(d["img_paths"]) - 1] * len(e.captions))
        return d

    dataset = PedesDataset(name, dataset_dir, train, eval_split(by_split["val"]), eval_split(by_split["test"]),
                           dict(enumerate(train_ids)))
    dataset.train_alternatives = alternatives
    return dataset


def _hold_out(train: List[Entry], val: List[Entry], n: int, source: str) -> Tuple[List[Entry], List[Entry]]:
    if val:
        raise UserError(f"{source} already has a val split ({len(val)} images); val_holdout_ids must be 0")
    ids = sorted({e.pid for e in train})
    if n >= len(ids):
        raise UserError(f"val_holdout_ids ({n}) must be smaller than the number of training identities "
                        f"({len(ids)}) of {source}")
    held = set(ids[-n:])
    return [e for e in train if e.pid not in held], [e for e in train if e.pid in held]


def read_annotation_file(fmt: AnnotationFormat, root_dir: str) -> Annotations:
    """The annotations of a data set in `fmt`'s layout under `root_dir` (its folder layout checked)."""
    dataset_dir, ann_path = locate(fmt, root_dir)
    return Annotations(read_json_list(ann_path), os.path.join(dataset_dir, "imgs"), ann_path, dataset_dir,
                       fmt.path_key, fmt.splits)


def dataset_from_annotations(name: str, annotations: Annotations, *, val_holdout_ids: int = 0,
                             skip_missing_images: bool = False, check_images: bool = True) -> PedesDataset:
    """Check every entry (keys, types, ids, captions, splits) and, unless `check_images` is off, that every image
    is on disk; then build the splits. Each problem is one UserError line naming the source and entry."""
    if not isinstance(annotations.entries, list):
        raise UserError(f"{annotations.source}: expected a list of entries (one per image), got "
                        f"{_json_type(annotations.entries)}")
    entries = parse_entries(annotations.entries, annotations.source, annotations)
    if check_images:
        entries = drop_missing_images(entries, annotations.image_dir, annotations.source, skip_missing_images)
    dataset = build_splits(name, annotations.dataset_dir or annotations.image_dir, entries, val_holdout_ids,
                           source=annotations.source, img_dir=annotations.image_dir)
    dataset.annotation_file = annotations.source if os.path.isfile(annotations.source) else None
    return dataset
