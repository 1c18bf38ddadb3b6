"""Where a training step's CPU time goes: matrix products and attention against the rest, per precision.

    python -m benchmarks.step_profile --config configs/demo.yaml --arch ViT-Demo --img_size 96 32 --text_length 32 \
        --batch_size 128 --modes fp32,bf16

The question it answers (issue 28): on a CPU where bf16 trains slower than fp32, is it the matrix products (no
fast bf16 kernels) or the rest (conversions, element-wise work, the attention path of model/attention.py)? It runs
the trainer's own step (`Trainer.train_step`) on a synthetic batch under torch.profiler and sums each operator's
self time; an operator counts as a matrix product when its name holds one of MATMUL_OPS. The CPU model and its
bf16 / fp16 flags are printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from processor.precision import describe_cpu
from processor.synthetic import synthetic_setup
from processor.trainer import Trainer
from utils.cli import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL_OPS = ("mm", "matmul", "linear", "bmm", "baddbmm", "scaled_dot_product", "conv")


def profile_step(args: argparse.Namespace, precision: str) -> Dict[str, object]:
    cfg, model, batch = synthetic_setup(args.config, {"pretrain_choice": args.arch, "img_size": args.img_size,
                                                      "text_length": args.text_length, "precision": precision},
                                        args.batch_size, torch.device("cpu"))
    trainer = Trainer(cfg, model, device=torch.device("cpu"))
    model.train()
    for _ in range(args.warmup):
        trainer.train_step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.train_step(batch)
    ops = [(e.key, e.self_cpu_time_total / 1e3 / args.steps) for e in prof.key_averages()]
    total = sum(ms for _, ms in ops)
    matmul = sum(ms for name, ms in ops if any(k in name for k in MATMUL_OPS))
    return {"precision": precision, "step_ms": total, "matmul_ms": matmul, "share": matmul / max(total, 1e-9),
            "top": sorted(ops, key=lambda o: -o[1])[:args.top]}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = command("python -m benchmarks.step_profile", __doc__.split("\n")[0], options=False)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--arch", default="ViT-Demo")
    p.add_argument("--img_size", type=int, nargs=2, default=[96, 32], metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated, from fp32 and bf16")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=10, help="operators listed per mode")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in ("fp32", "bf16") for m in args.mode_list):
        p.error(f"--modes {args.modes!r}: expected a comma-separated list from fp32, bf16")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    print(f"CPU {describe_cpu()}, {torch.get_num_threads()} threads; {os.path.basename(args.config)}, {args.arch} "
          f"at {args.img_size[0]}x{args.img_size[1]}, text {args.text_length}, batch {args.batch_size}; "
          f"self CPU time per step, {args.steps} profiled steps")
    for mode in args.mode_list:
        result = profile_step(args, mode)
        print(f"{mode}: {result['step_ms']:.1f} ms per step, matrix products and attention "
              f"{result['matmul_ms']:.1f} ms ({result['share']:.3f}), the rest "
              f"{result['step_ms'] - result['matmul_ms']:.1f} ms")
        for name, ms in result["top"]:
            print(f"    {name[:50]:<50} {ms:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
