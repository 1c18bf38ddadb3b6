"""Check a data set on disk: layout, annotation file, image files (optionally decoding each), statistics.

    python -m tools.check_dataset --dataset_name CUHK-PEDES --root_dir ./data [--decode]
    python -m tools.check_dataset --dataset_name custom --annotation_file my.csv --decode
    python -m tools.check_dataset --config_file RUN/configs.yaml --decode

Every option of a data set can be given (`--root_dir`, `--annotation_file`, `--val_holdout_ids`, a plug-in's own
with its `--custom_imports`), or read from a config file.

Prints the split summary and compares it with the published statistics (SPEC 2). Exit status: 0 when all is
well, 1 with a list of problems (statistics that differ, images that do not decode), 2 when the data set cannot
be loaded at all (the one-line reason is printed).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from datasets import PedesDataset, dataset_from_config
from datasets.image_text import read_image
from utils.cli import add_shared, command, integer, parse_command_line, run_main
from utils.config import build_config
from utils.errors import UserError

Stats = Tuple[int, int, Optional[int]]  # ids, images, captions (None: not checked per split)

# SPEC 2. CUHK-PEDES captions circulate as 80,412 and 80,440 in total, so only the total is checked, against both.
PUBLISHED: Dict[str, Dict[str, object]] = {
    "CUHK-PEDES": {"train": (11003, 34054, None), "val": (1000, 3078, None), "test": (1000, 3074, None),
                   "captions": (80412, 80440)},
    "ICFG-PEDES": {"train": (3102, 34674, 34674), "val": (0, 0, 0), "test": (1000, 19848, 19848),
                   "captions": (54522,)},
    "RSTPReid": {"train": (3701, 18505, 37010), "val": (200, 1000, 2000), "test": (200, 1000, 2000),
                 "captions": (41010,)},
}


def compare_statistics(dataset: PedesDataset) -> List[str]:
    """Differences between the data set's counts and the published ones (empty when none are published)."""
    published = PUBLISHED.get(dataset.name)
    if published is None:
        return []
    problems = []
    stats = dataset.statistics()
    for split in ("train", "val", "test"):
        for what, got, expected in zip(("ids", "images", "captions"), stats[split], published[split]):
            if expected is not None and got != expected:
                problems.append(f"{split} {what}: {got:,} (published: {expected:,})")
    total = sum(s[2] for s in stats.values())
    accepted = published["captions"]
    if total not in accepted:
        problems.append(f"total captions: {total:,} (published: {' or '.join(f'{n:,}' for n in accepted)})")
    return problems


def decode_all(dataset: PedesDataset, workers: int) -> List[str]:
    """Open and decode every image of every split; return one line per image that fails."""
    paths = sorted({p[2] for p in dataset.train} | set(dataset.val["img_paths"]) | set(dataset.test["img_paths"]))

    def check(path: str) -> Optional[str]:
        try:
            read_image(path)
        except UserError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [msg for msg in pool.map(check, paths, chunksize=64) if msg]


COMMAND = command("python -m tools.check_dataset", __doc__)
COMMAND.add_argument("--config_file", metavar="FILE",
                     help="read the data set's options from this config (then the command line's)")
COMMAND.add_argument("--decode", action="store_true", help="also open and decode every image")
COMMAND.add_argument("--workers", type=integer, default=os.cpu_count() or 1, help="threads used by --decode")
add_shared(COMMAND, "debug")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_command_line(COMMAND, argv)
    if not args.config_file and "dataset_name" not in args.overrides:
        raise UserError("name the data set: --dataset_name NAME (or --config_file FILE)")
    dataset = dataset_from_config(build_config(args.config_file, args.overrides))
    print(dataset.summary())
    problems = compare_statistics(dataset)
    if args.decode:
        problems += decode_all(dataset, max(1, args.workers))
    if problems:
        print(f"{len(problems)} problem(s):")
        for line in problems:
            print(f"  - {line}")
        return 1
    print("all checks passed" + ("" if dataset.name in PUBLISHED else " (no published statistics to compare)"))
    return 0


if __name__ == "__main__":
    run_main(main)
