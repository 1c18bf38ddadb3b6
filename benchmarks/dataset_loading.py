"""Time `dataset_from_config` (annotation parse and every check, image listing included) on a CUHK-PEDES-sized set.

    python -m benchmarks.dataset_loading [--runs 5] [--keep DIR]

Writes a synthetic CUHK-PEDES (40,206 entries with two captions and their processed tokens each, the published
split sizes, empty image files in seven subfolders) under a temporary folder, then prints the median of
`--runs` timed calls. Target: under 5 s on the 2-core CPU dev box.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time


from datasets import dataset_from_config
from utils.cli import command
from utils.config import Config

FOLDERS = ("cam_a", "cam_b", "CUHK01", "CUHK03", "Market", "test_query", "train_query")
SPLITS = (("train", 11003, 34054), ("val", 1000, 3078), ("test", 1000, 3074))
WORDS = ("the man woman is wearing a black white red blue jacket shirt pants jeans shoes bag backpack with "
         "long short hair and carrying walking").split()


def write_synthetic_cuhk(root: str, seed: int = 0) -> None:
    """A CUHK-PEDES-sized annotation file with matching empty image files under `root`/CUHK-PEDES."""
    rng = random.Random(seed)
    base = os.path.join(root, "CUHK-PEDES")
    for folder in FOLDERS:
        os.makedirs(os.path.join(base, "imgs", folder), exist_ok=True)
    entries, pid, n = [], 1, 0
    for split, ids, images in SPLITS:
        for k in range(images):
            # Spread the split's images over its identities, every identity getting at least one.
            pid_k = pid + (k * ids) // images
            rel = f"{FOLDERS[n % len(FOLDERS)]}/{n:06d}.jpg"
            captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 40))) + "." for _ in range(2)]
            entries.append({"split": split, "captions": captions, "file_path": rel,
                            "processed_tokens": [c.rstrip(".").split() for c in captions], "id": pid_k})
            open(os.path.join(base, "imgs", rel), "wb").close()
            n += 1
        pid += ids
    with open(os.path.join(base, "reid_raw.json"), "w", encoding="utf-8") as f:
        json.dump(entries, f)


def main() -> None:
    parser = command("python -m benchmarks.dataset_loading", __doc__.split("\n")[0], options=False)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", default="", help="write the set here (kept) instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        t0 = time.perf_counter()
        write_synthetic_cuhk(root)
        print(f"wrote the synthetic set in {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            dataset = dataset_from_config(Config(dataset_name="CUHK-PEDES", root_dir=root))
            times.append(time.perf_counter() - t0)
        print(dataset.summary())
        print("runs (s): " + ", ".join(f"{t:.2f}" for t in times))
        print(f"dataset_from_config median over {args.runs} runs: {statistics.median(times):.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
