"""Count the operations one training step dispatches, per part of the model.

    python -m benchmarks.step_ops --json out.json
    python -m benchmarks.step_ops --config configs/demo.yaml --arch ViT-Demo --img_size 128 48 --text_length 48
    python -m benchmarks.step_ops --num_experts 8        # any other config option, as train.py takes them

On a GPU at the papers' batch sizes the step is bound by the host thread that launches kernels (see
benchmarks/README.md), so the number of operations per step matters as much as their FLOPs. This counts the
aten operations that do work (views, other aliasing operations and allocations excluded: they launch no
kernel) in one `Trainer.train_step` (autocast forward, the losses and the step's logged values, backward, optimizer)
after one warm-up step, and attributes the forward's to the module that ran them. The backward starts at
`Tensor.backward`, the optimizer part at the optimizer's step (with fp16, the GradScaler's inf check before it
counts in the backward). The count depends on the model's structure, not
its width or the batch size, so a small batch on the CPU gives the figure of a large one on a GPU, except that
the CPU's bf16 attention in the towers (model/attention.py) takes a few operations per block where CUDA makes
one SDPA call.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Dict, List, Optional
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from model.backbone import ARCHITECTURES
from processor.synthetic import synthetic_setup
from processor.trainer import Trainer
from utils.cli import command, parse_command_line, run_main

# Aliasing or bookkeeping operations that func.is_view does not mark; allocations launch no kernel either.
NO_KERNEL = {"_unsafe_view", "empty", "empty_strided", "_record_function_enter_new", "_record_function_exit"}
# Forward operations are attributed to the innermost of these that is running (dotted module names).
PARTS = ("backbone.visual", "backbone.transformer", "php.crfm", "php.efp", "classifier", "mlm")


class OpCounter(TorchDispatchMode):
    """Counts non-aliasing aten operations under the label in `self.phase`."""

    def __init__(self):
        super().__init__()
        self.phase = "other"
        self.counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def set_phase(self, name: str) -> None:
        self.phase = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.counts[self.phase][name] += 1
        return func(*args, **(kwargs or {}))


def attribute_forward(model: torch.nn.Module, counter: OpCounter) -> List:
    """Hooks that set the counter's phase to the part whose forward is running; returns the handles."""
    handles, stack = [], []
    for name, module in model.named_modules():
        if name not in PARTS:
            continue

        def enter(_module, _inputs, name=name):
            stack.append(counter.phase)
            counter.phase = f"forward: {name}"

        def leave(_module, _inputs, _output):
            counter.phase = stack.pop()

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def count_step(args: argparse.Namespace) -> Dict[str, Dict[str, int]]:
    device = torch.device(args.device)
    overrides = {**args.overrides, "pretrain_choice": args.arch, "img_size": args.img_size,
                 "text_length": args.text_length, "precision": args.precision}
    cfg, model, batch = synthetic_setup(args.config, overrides, args.batch_size, device)
    model.train()
    trainer = Trainer(cfg, model, device=device)
    trainer.train_step(batch)  # creates the optimizer's state

    counter = OpCounter()
    handles = attribute_forward(model, counter)
    handles.append(trainer.optimizer.register_step_pre_hook(lambda *_: counter.set_phase("optimizer")))
    backward = torch.Tensor.backward

    def counted_backward(tensor, *a, **kw):
        counter.set_phase("backward")
        return backward(tensor, *a, **kw)

    with counter, mock.patch.object(torch.Tensor, "backward", counted_backward):
        counter.phase = "forward: other (embeddings, pooling, losses)"
        trainer.train_step(batch)
    for h in handles:
        h.remove()
    return {phase: dict(c) for phase, c in counter.counts.items()}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = command("python -m benchmarks.step_ops", __doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "php_cuhk.yaml"), help="preset to count")
    p.add_argument("--arch", default="ViT-B-16", help="random-weight backbone (model/backbone.py ARCHITECTURES)")
    p.add_argument("--img_size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="")
    args = parse_command_line(p, argv)  # config options (--num_experts 6) as args.overrides
    if args.arch not in ARCHITECTURES:
        p.error(f"--arch {args.arch}: expected one of {', '.join(ARCHITECTURES)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    counts = count_step(args)
    totals = {phase: sum(c.values()) for phase, c in counts.items()}
    print(f"{args.config}, {args.arch}, {args.precision} on {args.device}: operations per training step "
          f"(views and allocations excluded)")
    for phase, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        top = ", ".join(f"{op} {k}" for op, k in collections.Counter(counts[phase]).most_common(4))
        print(f"{n:>7}  {phase}   [{top}]")
    print(f"{sum(totals.values()):>7}  total")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"totals": totals, "total": sum(totals.values()), "ops": counts, "args": vars(args)}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    run_main(main)
