"""Wall time of the smoke run (configs/smoke.yaml) in one process and as two processes under torchrun.

    python benchmarks/ddp_smoke.py [--root_dir DIR] [--repeats 3] [--nproc 2]

Without `--root_dir` it generates the test-sized Demo-PEDES of tests/conftest.py (60 / 20 / 20 identities) in a
temporary folder. The variants run in turn, `--repeats` rounds, each into a fresh output folder:
  1 process         `python train.py --config_file configs/smoke.yaml --root_dir R --output_dir O`
  1 process, 1 thr  the same with OMP_NUM_THREADS=1 (what torchrun gives each of its processes)
  N processes       `python -m torch.distributed.run --standalone --nproc_per_node=N train.py ...` (same options)
Printed per variant: the median wall time of the whole command (start-up and evaluation included), the median
sum of the per-epoch training seconds from history.json, and the ratios against the 1-process run. The global
batch (batch_size 32) and therefore the number of optimizer steps are the same in every variant.
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
sys.path.insert(0, ROOT)

from datasets.demo_pedes import generate_demo_pedes  # noqa: E402

SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.yaml")
TEST_SIZES = {"num_train_ids": 60, "num_val_ids": 20, "num_test_ids": 20, "images_per_id": 4}


def variants(nproc: int) -> Dict[str, Tuple[List[str], Dict[str, str]]]:
    """name: (command prefix before train.py's arguments, extra environment)."""
    return {
        "1 process": ([sys.executable, "train.py"], {}),
        "1 process, 1 thread": ([sys.executable, "train.py"], {"OMP_NUM_THREADS": "1"}),
        f"{nproc} processes (torchrun)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={nproc}", "train.py"], {}),
    }


def run_once(prefix: List[str], env: Dict[str, str], root: str, out: str) -> Tuple[float, float]:
    """(wall seconds of the command, summed per-epoch training seconds from its history.json)."""
    cmd = prefix + ["--config_file", SMOKE_CONFIG, "--root_dir", root, "--output_dir", out]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "Demo-PEDES", "smoke", "history.json")) as f:
        history = json.load(f)
    return wall, sum(h["seconds"] for h in history)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root_dir", default="", help="data root holding Demo-PEDES/ (default: generate a small one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddp_smoke_") as tmp:
        root = args.root_dir
        if not root:
            root = os.path.join(tmp, "data")
            generate_demo_pedes(os.path.join(root, "Demo-PEDES"), seed=0, **TEST_SIZES)
        times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in variants(args.nproc)}
        for r in range(args.repeats):
            for i, (name, (prefix, env)) in enumerate(variants(args.nproc).items()):
                times[name].append(run_once(prefix, env, root, os.path.join(tmp, f"out_{r}_{i}")))
                print(f"round {r + 1} {name}: {times[name][-1][0]:.1f} s", flush=True)
    base_wall = statistics.median(t[0] for t in times["1 process"])
    base_train = statistics.median(t[1] for t in times["1 process"])
    print(f"\n{'variant':28s} {'wall s':>8s} {'x 1-proc':>9s} {'train s':>8s} {'x 1-proc':>9s}")
    for name, values in times.items():
        wall, train = statistics.median(t[0] for t in values), statistics.median(t[1] for t in values)
        print(f"{name:28s} {wall:8.1f} {wall / base_wall:9.2f} {train:8.1f} {train / base_train:9.2f}")
    print(f"(medians of {args.repeats}; os.cpu_count() = {os.cpu_count()}; 'train s' = summed epoch seconds "
          f"without start-up and evaluation)")


if __name__ == "__main__":
    main()
