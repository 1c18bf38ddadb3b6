"""Images per second through the training data pipeline (decode, resize, augmentation, collation) per worker count,
set against the model step's samples per second, to show whether data loading limits training.

    python -m benchmarks.data_pipeline --workers 0,1,2,8 --batch_size 64 [--cache off,on] [--root_dir ./data]
        [--dataset_name Demo-PEDES] [--step_json out.json | --step_samples_per_s 12.5] [--json pipeline.json]

Each worker count gets a fresh `build_train_loader` (the trainer's loader: its sampler, per-item seeding,
tokenisation, `img_aug` transforms, collate). The first batch (worker start-up, which the trainer pays once per
epoch since workers are not persistent) is timed apart; the rate is over the following `--batches` batches.
`--cache off,on` also measures each worker count with `cache_images` (images decoded and resized once, before
training; that preload is timed apart as well); its rows are keyed "<workers>+cache" in the JSON.
Demo-PEDES is generated under `--root_dir` when missing, at `--demo_image_size` (default 384x128, the model's
input size; CUHK-PEDES crops are mostly smaller, so decoding them costs less).

The step's rate comes from a `benchmarks/train_step.py` JSON (`--step_json`; the fastest mode in it unless
`--step_mode` names one) or is given directly (`--step_samples_per_s`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import model  # noqa: F401  (registers the methods' losses and heads, whose options a preset may set)
from datasets import dataset_from_config
from datasets.loaders import build_train_loader, set_loader_epoch
from utils.cli import command
from utils.config import Config, build_config


def ensure_demo(root_dir: str, image_size: List[int]) -> None:
    """Generate Demo-PEDES under `root_dir` at `image_size` (H, W) unless it is already there."""
    from datasets.demo_pedes import DATASET_NAME, generate_demo_pedes
    target = os.path.join(root_dir, DATASET_NAME)
    if not os.path.isfile(os.path.join(target, "reid_raw.json")):
        start = time.perf_counter()
        generate_demo_pedes(target, image_size=tuple(image_size))
        print(f"generated {target} at {image_size[0]}x{image_size[1]} in {time.perf_counter() - start:.1f} s")


def time_loader(cfg, dataset, batches: int, repeats: int) -> Dict[str, float]:
    """Preload and start-up time (first batch) and the median images/s over `repeats` passes of `batches`."""
    start = time.perf_counter()
    loader = build_train_loader(cfg, dataset)
    preload = time.perf_counter() - start
    available = len(loader) - 1
    if available < 1:
        raise SystemExit(f"error: the train split gives {len(loader)} batch(es) of {cfg.batch_size}; need >= 2")
    batches = min(batches, available)
    startups, rates = [], []
    for epoch in range(1, repeats + 1):
        set_loader_epoch(loader, epoch)
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter()
        for _ in range(batches):
            next(it)
        end = time.perf_counter()
        del it  # shuts the workers down before the next pass
        startups.append(first - start)
        rates.append(batches * cfg.batch_size / (end - first))
    return {"images_per_s": statistics.median(rates), "startup_s": statistics.median(startups),
            "preload_s": preload, "batches": batches, "passes_images_per_s": [round(r, 2) for r in rates]}


def step_rate(args: argparse.Namespace) -> Tuple[Optional[float], str]:
    """The model step's samples/s and where it came from."""
    if args.step_samples_per_s:
        return args.step_samples_per_s, "given"
    if not args.step_json:
        return None, ""
    with open(args.step_json, encoding="utf-8") as f:
        results = json.load(f)
    modes = {m: e["samples_per_s"] for m, e in results.items()
             if not m.startswith("_") and isinstance(e, dict) and e.get("samples_per_s")}
    if args.step_mode:
        if args.step_mode not in modes:
            raise SystemExit(f"error: {args.step_json} has no result for mode {args.step_mode!r} "
                             f"(has {', '.join(modes) or 'none'})")
        mode = args.step_mode
    elif modes:
        mode = max(modes, key=modes.get)
    else:
        raise SystemExit(f"error: {args.step_json} holds no measured mode")
    meta = results.get("_meta", {})
    return modes[mode], f"{mode} at batch {meta.get('batch_size', '?')} on {meta.get('device_name', '?')}"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = command("python -m benchmarks.data_pipeline", __doc__.split("\n")[0], options=False)
    p.add_argument("--workers", default="0,1,2,8", help="comma-separated loader worker counts")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--cache", default="off", help="cache_images settings to measure: off, on or off,on")
    p.add_argument("--batches", type=int, default=10, help="timed batches per pass (after the first)")
    p.add_argument("--repeats", type=int, default=1, help="passes per worker count; the median is kept")
    p.add_argument("--root_dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--dataset_name", default="Demo-PEDES")
    p.add_argument("--demo_image_size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"),
                   help="image size of a Demo-PEDES generated here")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "php_cuhk.yaml"),
                   help="preset whose data options (img_size, img_aug, sampler, losses) are used")
    p.add_argument("--step_json", default="", help="a benchmarks/train_step.py JSON")
    p.add_argument("--step_mode", default="", help="the mode of --step_json to compare with (default: fastest)")
    p.add_argument("--step_samples_per_s", type=float, default=0.0, help="the step's rate, given directly")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected comma-separated integers such as 0,1,2,8")
    if not args.worker_counts or min(args.worker_counts) < 0:
        p.error(f"--workers {args.workers!r}: expected non-negative worker counts")
    args.cache_modes = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not args.cache_modes or set(args.cache_modes) - {"off", "on"}:
        p.error(f"--cache {args.cache!r}: expected off, on or off,on")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.dataset_name == "Demo-PEDES":
        ensure_demo(args.root_dir, args.demo_image_size)
    dataset = dataset_from_config(Config(dataset_name=args.dataset_name, root_dir=args.root_dir))
    step, step_source = step_rate(args)
    results: Dict[str, object] = {}
    cfg0 = build_config(args.config, {"dataset_name": args.dataset_name, "root_dir": args.root_dir,
                                      "batch_size": args.batch_size})
    print(f"{args.dataset_name}: {len(dataset.train)} training pairs; batch {args.batch_size}; "
          f"img_size {cfg0.img_size[0]}x{cfg0.img_size[1]}, img_aug {cfg0.img_aug}; {os.cpu_count()} CPUs")
    if step:
        print(f"model step: {step:.2f} samples/s ({step_source})")
    print(f"{'workers':>7} {'cache':>5} {'images/s':>9} {'preload s':>9} {'start-up s':>10} {'vs step':>8}")
    for workers in args.worker_counts:
        for cache in args.cache_modes:
            cfg = build_config(args.config, {"dataset_name": args.dataset_name, "root_dir": args.root_dir,
                                             "batch_size": args.batch_size, "num_workers": workers,
                                             "cache_images": cache == "on"})
            r = time_loader(cfg, dataset, args.batches, args.repeats)
            if step:
                r["vs_step"] = r["images_per_s"] / step
            results[f"{workers}+cache" if cache == "on" else str(workers)] = r
            ratio = f"{r['vs_step']:.2f}x" if step else "-"
            limit = "  data-bound" if step and r["vs_step"] < 1 else ""
            print(f"{workers:>7} {cache:>5} {r['images_per_s']:>9.1f} {r['preload_s']:>9.2f} "
                  f"{r['startup_s']:>10.2f} {ratio:>8}{limit}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {"dataset_name": args.dataset_name, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                "img_size": cfg0.img_size, "img_aug": cfg0.img_aug, "step_samples_per_s": step,
                "step_source": step_source}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"workers": results, "_meta": meta}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
