"""Time one attention layer's forward + backward on the CPU: SDPA's math and flash kernels against the towers'
CPU path (model/attention.py), in fp32 and under bf16 autocast, at the demo's and the paper's shapes.

    python -m benchmarks.attention_cpu --repeats 30 --json out.json

Every figure is the median of `--repeats` timed calls after 3 warm-up calls, all in this one process, so the
ratios between rows are fair on a noisy machine. Shapes: batch x heads x tokens, head width 64.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


from model.attention import TowerAttention
from utils.cli import command

# (label, batch, width, tokens, causal): the towers of configs/demo.yaml (batch 64) and of ViT-B/16 (batch 8)
SHAPES = [("demo image", 64, 256, 25, False), ("demo text", 64, 256, 48, True),
          ("ViT-B/16 image", 8, 768, 193, False), ("ViT-B/16 text", 8, 512, 77, True)]
KERNELS = {"sdpa math": [SDPBackend.MATH], "sdpa flash": [SDPBackend.FLASH_ATTENTION], "tower (ours)": None}


def median_time(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_step(batch: int, width: int, tokens: int, causal: bool, kernel, dtype) -> Callable[[], None]:
    """One forward + backward of an attention layer (projections included) with the given kernel choice."""
    torch.manual_seed(0)
    module = TowerAttention(width, width // 64)
    x = torch.randn(batch, tokens, width, requires_grad=True)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1) if causal else None
    # SDPA rows call open_clip's forward (the parent's) under the chosen kernel; ours calls the module itself.
    forward = module.forward if kernel is None else super(TowerAttention, module).forward

    def step():
        kernels = contextlib.nullcontext() if kernel is None else sdpa_kernel(kernel)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), kernels:
            out = forward(x, attn_mask=mask)
        out.float().sum().backward()
    return step


def main() -> int:
    parser = command("python -m benchmarks.attention_cpu", __doc__.split("\n\n")[0], options=False)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: Dict[str, Dict[str, float]] = {}
    print(f"{'shape':<16} {'dtype':<6} " + " ".join(f"{k:>14}" for k in KERNELS) + "   (ms, fwd+bwd)")
    for label, batch, width, tokens, causal in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            name = "fp32" if dtype == torch.float32 else "bf16"
            row = {k: 1e3 * median_time(layer_step(batch, width, tokens, causal, v, dtype), args.repeats)
                   for k, v in KERNELS.items()}
            results[f"{label} {name}"] = row
            print(f"{label:<16} {name:<6} " + " ".join(f"{row[k]:>14.2f}" for k in KERNELS), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms_fwd_bwd": results, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
