"""What the restricted reading of checkpoints costs at paper size, against the reading it replaced.

    python -m benchmarks.restricted_load [--repeats 5] [--config configs/tbps_cuhk.yaml]

Writes two files of the paper-size model with a filled Adam state (about 1.8 GB each for TBPS-CLIP's ViT-B/16):
- `plain.pth`, a checkpoint as this project writes it: `utils.checkpoint.read_checkpoint` (torch's weights-only
  loader, then the check that no tensor is larger than its storage) against `torch.load(weights_only=True)` alone,
  which is what read it before;
- `tbps.pth`, the same state with an `easydict.EasyDict` config and numpy.float64 learning rates, as TBPS-CLIP
  writes it: the restricted reader of utils/tensor_archive.py against the former fallback, torch.load with a
  C-pickle Unpickler whose find_class held the same allow-list (`former_fallback` below; it let BUILD, NEWOBJ
  and the memo through).
Checksums are not verified in either (their cost is benchmarks/checkpoint_load.py's). Reports medians of
interleaved repeats, page cache warm, and the ratios.
"""
from __future__ import annotations

import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch

from processor.synthetic import stepped_checkpoint
from utils import safe_unpickle, tensor_archive
from utils.checkpoint import read_checkpoint
from utils.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EasyDict(dict):
    """What TBPS-CLIP pickles its config as."""


EasyDict.__module__ = "easydict"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def former_fallback() -> types.ModuleType:
    """The reading this project did before the restricted unpickler: a C Unpickler with an allow-list."""
    allowed = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
               ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
               ("collections", "OrderedDict"): __import__("collections").OrderedDict,
               ("torch", "Size"): torch.Size, ("torch", "device"): torch.device, ("easydict", "EasyDict"): dict,
               ("numpy", "dtype"): np.dtype, ("numpy.core.multiarray", "scalar"): np.core.multiarray.scalar,
               ("numpy._core.multiarray", "scalar"): np.core.multiarray.scalar,
               ("_codecs", "encode"): __import__("codecs").encode}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return allowed[(module, name)]

    return types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, dump=pickle.dump, __name__="former")


def write_files(folder: str, config: str) -> None:
    cfg, state = stepped_checkpoint(config, {"output_dir": folder})
    torch.save(state, os.path.join(folder, "plain.pth"))
    optimizer = state["optimizer"]
    for group in optimizer["param_groups"]:
        group["lr"] = np.float64(group["lr"])
    sys.modules["easydict"] = types.SimpleNamespace(EasyDict=EasyDict)
    try:
        torch.save({"model": state["model"], "optimizer": optimizer, "config": EasyDict(cfg.to_dict())},
                   os.path.join(folder, "tbps.pth"))
    finally:
        del sys.modules["easydict"]


def main() -> None:
    p = command("python -m benchmarks.restricted_load", __doc__, options=False)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tbps_cuhk.yaml"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    folder = tempfile.mkdtemp(prefix="restricted-load-")
    try:
        write_files(folder, args.config)
        plain, tbps = os.path.join(folder, "plain.pth"), os.path.join(folder, "tbps.pth")
        former = former_fallback()
        cases = {
            "plain: read_checkpoint": lambda: read_checkpoint(plain, verify=False),
            "plain: torch.load weights_only": lambda: torch.load(plain, map_location="cpu", weights_only=True),
            "tbps: restricted reader": lambda: tensor_archive.load(tbps),
            "tbps: former fallback": lambda: safe_unpickle.plain(
                torch.load(tbps, map_location="cpu", weights_only=False, pickle_module=former)),
        }
        for fn in cases.values():
            fn()  # page cache and imports warm
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                times[name].append(timed(fn))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; plain.pth "
              f"{os.path.getsize(plain) / 2 ** 30:.2f} GiB, tbps.pth {os.path.getsize(tbps) / 2 ** 30:.2f} GiB; "
              f"medians of {args.repeats}")
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, value in medians.items():
            print(f"  {name:34s} {value:.3f} s (min {min(times[name]):.3f})")
        for new, old in (("plain: read_checkpoint", "plain: torch.load weights_only"),
                         ("tbps: restricted reader", "tbps: former fallback")):
            print(f"{new} / {old}: {medians[new] / medians[old]:.3f} (target < 1.05)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
