"""What RDE's per-epoch selection pass (CCD, methods/rde/ccd.py) costs against the epoch's training, per sample.

    python -m benchmarks.selection_pass --device cpu --config configs/rde_cuhk.yaml --batch_size 8 --precision bf16
    python -m benchmarks.selection_pass --config configs/rde_demo.yaml --arch ViT-Demo --img_size 96 32 \
        --text_length 32 --batch_size 128 --precision bf16 --pairs 4800

An epoch trains on every pair once and, before it, CCD computes every pair's TAL for both embeddings once, in eval
and inference mode (`methods.rde.ccd.batch_losses`, the pass's own code), then fits two Gaussian mixtures. So the
pass's share of an epoch is  select / (train + select)  per sample, plus the two fits over `--pairs` losses
(68,126: CUHK-PEDES's training pairs). Timed on synthetic batches with random weights, in the same process, the
two kinds of step alternating window by window so that a shared machine's load falls on both; the medians are
kept. Data loading, the same for both, is left out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

import numpy as np
import torch

from methods.rde.ccd import batch_losses, clean_probability, split
from processor.precision import describe_cpu
from processor.synthetic import synthetic_setup
from processor.trainer import Trainer
from utils.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds_per_sample(step: Callable[[], None], batch_size: int, steps: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / (steps * batch_size)


def gmm_seconds(pairs: int) -> float:
    """Both mixtures of one selection (the strong settings, the slower ones) on losses shaped like a real pass."""
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.gamma(2.0, 0.5, pairs // 2), rng.gamma(6.0, 0.5, pairs - pairs // 2)])
    clean_probability(losses[:100], strong=False)  # scikit-learn's import is a run's one-off, not a pass's cost
    t0 = time.perf_counter()
    for _ in range(2):
        split(clean_probability(losses, strong=True))
    return time.perf_counter() - t0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = command("python -m benchmarks.selection_pass", __doc__.split("\n")[0], options=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "rde_cuhk.yaml"))
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--img_size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="windows of each kind; the median is kept")
    p.add_argument("--pairs", type=int, default=68126, help="training pairs the mixtures are fitted to")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg, model, batch = synthetic_setup(args.config, {"pretrain_choice": args.arch, "img_size": args.img_size,
                                                      "text_length": args.text_length, "precision": args.precision},
                                        args.batch_size, device)
    trainer = Trainer(cfg, model, device=device)

    def train() -> None:
        model.train()
        trainer.train_step(batch)

    def select() -> None:
        model.eval()
        with torch.inference_mode():
            batch_losses(model, cfg, batch, device)

    train(), select()  # warm-up
    train_s, select_s = [], []
    for _ in range(args.repeats):
        train_s.append(seconds_per_sample(train, args.batch_size, args.steps, device))
        select_s.append(seconds_per_sample(select, args.batch_size, args.steps, device))
    t, s, fit = statistics.median(train_s), statistics.median(select_s), gmm_seconds(args.pairs)
    epoch_train, epoch_select = t * args.pairs, s * args.pairs + fit
    where = describe_cpu() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {args.device} ({where}), {torch.get_num_threads()} threads; {os.path.basename(args.config)}, "
          f"{args.arch} at {args.img_size[0]}x{args.img_size[1]}, text {args.text_length}, batch "
          f"{args.batch_size}, {args.precision}; medians of {args.repeats} windows of {args.steps} steps")
    print(f"train step   {1 / t:10.2f} samples/s")
    print(f"selection    {1 / s:10.2f} samples/s  ({s / t:.3f} of a training sample's time)")
    print(f"mixture fits {fit:10.2f} s for {args.pairs} pairs (both embeddings)")
    print(f"selection share of an epoch of {args.pairs} pairs: {epoch_select / (epoch_train + epoch_select):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
