"""What verifying a checkpoint's weight checksums adds to loading a paper-size run.

    python -m benchmarks.checkpoint_load [--repeats 5] [--keep DIR]

Writes a run folder as training does (configs.yaml, and best.pth with the model, its CRC-32s and a filled Adam
state: about 2 GB for the PHP paper model), then times `model.load_model` on it with the checksums verified (in a
thread, while the model is built) and, interleaved, with the check switched off, and the check alone. Reports
medians, the check's own share of a load and what it adds to one.
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from unittest import mock

import torch

from model import load_model
from processor.synthetic import stepped_checkpoint
from utils import checkpoint as checkpoint_module
from utils.checkpoint import save_checkpoint
from utils.cli import command
from utils.config import save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(folder: str, config: str) -> str:
    """A run folder of the paper-size PHP model with random weights; its configs.yaml."""
    cfg, state = stepped_checkpoint(config, {"output_dir": folder})
    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "configs.yaml"))
    save_checkpoint(state, os.path.join(folder, "best.pth"))
    return os.path.join(folder, "configs.yaml")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = command("python -m benchmarks.checkpoint_load", __doc__, options=False)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "php_cuhk.yaml"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", default="", help="write the run here and keep it (default: a temporary folder)")
    args = p.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        config = write_run(folder, args.config)
        path = os.path.join(folder, "best.pth")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        weights = sum(v.numel() * v.element_size() for v in ckpt["model"].values())
        load_model(config)  # warm the page cache and the imports
        with_check, without, check = [], [], []
        for _ in range(args.repeats):
            with_check.append(timed(lambda: load_model(config)))
            with mock.patch.object(checkpoint_module, "verify_weights", lambda c, p: None):
                without.append(timed(lambda: load_model(config)))
            check.append(timed(lambda: checkpoint_module.verify_weights(ckpt, path)))
        file_gb, weights_gb = os.path.getsize(path) / 2 ** 30, weights / 2 ** 30
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; best.pth {file_gb:.2f} GiB, model weights {weights_gb:.2f} GiB")
        w, wo, c = (statistics.median(x) for x in (with_check, without, check))
        print(f"load_model with the check:    median {w:.3f} s over {args.repeats} (min {min(with_check):.3f})")
        print(f"load_model without the check: median {wo:.3f} s (min {min(without):.3f})")
        print(f"the check alone:              median {c:.3f} s ({weights_gb / c:.2f} GiB/s)")
        print(f"the check costs {100 * c / wo:.1f}% of a load's time on its own; it adds {100 * (w - wo) / wo:+.1f}% "
              f"to load_model (target < 5%), since it runs while the model is built")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
