"""Wall time and throughput of a real training run (train.py) in one plain process and under torchrun.

    python -m benchmarks.ddp_smoke [--root_dir DIR] [--repeats 3] [--nproc 2]
    python -m benchmarks.ddp_smoke --config configs/php_cuhk.yaml --device cuda --nproc 1 --repeats 1 \\
        --variants plain,torchrun --root_dir DIR --set dataset_name=Demo-PEDES --set num_epoch=2

Without `--root_dir` it generates the test-sized Demo-PEDES of tests/conftest.py (60 / 20 / 20 identities) in a
temporary folder. The variants run in turn, `--repeats` rounds, each into a fresh output folder:
  plain       `python train.py --config_file C --root_dir R --output_dir O [--key value ...]`
  plain-omp1  the same with OMP_NUM_THREADS=1 (what torchrun gives each of its processes when N > 1)
  torchrun    `python -m torch.distributed.run --standalone --nproc_per_node=N train.py ...` (same options)
Printed per variant: the median wall time of the whole command (start-up and evaluation included), the median
sum of the per-epoch training seconds from history.json, the last epoch's samples/s (the steady state: the first
epoch also pays for CUDA/cuDNN warm-up), and the ratios against the first variant. The global batch and so the
number of optimizer steps are the same in every variant (batch_size_scope: global).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from datasets.demo_pedes import generate_demo_pedes
from utils.cli import command

SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.yaml")
TEST_SIZES = {"num_train_ids": 60, "num_val_ids": 20, "num_test_ids": 20, "images_per_id": 4}
VARIANTS = ("plain", "plain-omp1", "torchrun")


def variant(name: str, nproc: int) -> Tuple[List[str], Dict[str, str]]:
    """(command prefix before train.py's arguments, extra environment) of a variant."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "train.py"], {}
    return [sys.executable, "train.py"], ({"OMP_NUM_THREADS": "1"} if name == "plain-omp1" else {})


def run_once(prefix: List[str], env: Dict[str, str], args: argparse.Namespace, root: str,
             out: str) -> Tuple[float, float, float]:
    """(wall seconds of the command, summed epoch training seconds, last epoch's samples/s) from history.json."""
    cmd = prefix + ["--config_file", args.config, "--root_dir", root, "--output_dir", out, "--name", "bench"]
    cmd += ["--device", args.device] if args.device else []
    for item in args.set:
        key, _, value = item.partition("=")
        cmd += [f"--{key}"] + value.split()  # 'img_size=384 128' gives two values
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    found = [os.path.join(d, "history.json") for d, _, files in os.walk(out) if "history.json" in files]
    if len(found) != 1:
        raise SystemExit(f"expected one history.json under {out}, found {found}")
    with open(found[0]) as f:
        history = json.load(f)
    return wall, sum(h["seconds"] for h in history), history[-1].get("samples_per_s", float("nan"))


def parse_args() -> argparse.Namespace:
    p = command("python -m benchmarks.ddp_smoke", __doc__, options=False)
    p.add_argument("--root_dir", default="", help="data root holding the data set (default: generate a small one)")
    p.add_argument("--config", default=SMOKE_CONFIG, help="train.py --config_file (default: configs/smoke.yaml)")
    p.add_argument("--device", default="", help="train.py --device (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train.py override")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--json", default="", help="write the medians here")
    args = p.parse_args()
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or not args.variant_list:
        p.error(f"--variants: unknown {bad} (expected a comma-separated list from {', '.join(VARIANTS)})")
    if any("=" not in item for item in args.set):
        p.error("--set: expected KEY=VALUE")
    return args


def main() -> None:
    args = parse_args()
    names = {v: v if v != "torchrun" else f"torchrun x{args.nproc}" for v in args.variant_list}
    with tempfile.TemporaryDirectory(prefix="ddp_smoke_") as tmp:
        root = args.root_dir
        if not root:
            root = os.path.join(tmp, "data")
            generate_demo_pedes(os.path.join(root, "Demo-PEDES"), seed=0, **TEST_SIZES)
        times: Dict[str, List[Tuple[float, float, float]]] = {v: [] for v in args.variant_list}
        for r in range(args.repeats):
            for i, v in enumerate(args.variant_list):
                prefix, env = variant(v, args.nproc)
                times[v].append(run_once(prefix, env, args, root, os.path.join(tmp, f"out_{r}_{i}")))
                wall, train, rate = times[v][-1]
                print(f"round {r + 1} {names[v]}: {wall:.1f} s wall, {train:.1f} s training, "
                      f"{rate:.1f} samples/s in the last epoch", flush=True)
    medians = {v: [statistics.median(t[j] for t in values) for j in range(3)] for v, values in times.items()}
    base = medians[args.variant_list[0]]
    print(f"\n{'variant':16s} {'wall s':>8s} {'ratio':>6s} {'train s':>8s} {'ratio':>6s} "
          f"{'samples/s':>10s} {'ratio':>6s}")
    for v, (wall, train, rate) in medians.items():
        print(f"{names[v]:16s} {wall:8.1f} {wall / base[0]:6.2f} {train:8.1f} {train / base[1]:6.2f} "
              f"{rate:10.1f} {rate / base[2]:6.2f}")
    print(f"(medians of {args.repeats}; os.cpu_count() = {os.cpu_count()}; 'train s' = summed epoch seconds "
          f"without start-up and evaluation; samples/s of the last epoch; "
          f"ratios against '{names[args.variant_list[0]]}')")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({names[v]: {"wall_s": m[0], "train_s": m[1], "samples_per_s": m[2], "rounds": times[v]}
                       for v, m in medians.items()} | {"_meta": {"config": args.config, "set": args.set,
                                                                 "nproc": args.nproc, "device": args.device}},
                      f, indent=1)


if __name__ == "__main__":
    main()
