"""Device, precision and seeding helpers shared by the entry points and the trainer."""
from __future__ import annotations

import contextlib
import random

import torch

from utils.config import DEVICE_PATTERN
from utils.errors import UserError, short_repr

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise UserError(f"option 'device' must be auto, cpu, cuda or cuda:N; got {short_repr(name)}")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
    return device


def runtime_precision(precision: str) -> str:
    """What `precision` computes in: itself, and fp32 for 'auto'. Training resolves 'auto' before its first step
    and records the choice (processor/precision.py), so only a config that never trained says 'auto' here (a
    preset given to test.py, say); fp32 is exact, so its numbers differ from the run's own by rounding at most."""
    return "fp32" if precision == "auto" else precision


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision`; fp32 (and so 'auto', see runtime_precision) runs without one. (The CPU
    attention path that makes bf16 pay off there is in model/attention.py.)"""
    dtype = PRECISIONS[runtime_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global RNG (dropout) at the start of `epoch`: a function of (seed, epoch) only, so a
    resumed run continues exactly as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7_919) % (2 ** 63)
