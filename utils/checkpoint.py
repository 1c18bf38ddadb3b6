"""Checkpoint files: crash-safe writes and safe reads.

Writes go to a temporary file in the same folder, are flushed to disk (fsync), then renamed over the target, so
a run killed at any moment leaves either the old or the new file, never a torn one. Reads use
`torch.load(weights_only=True)`: a file that needs arbitrary unpickling is refused, never executed, unless the
caller opts in for a trusted file.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any

import torch

from utils.errors import UserError

TRUST_FLAG = "--trust_checkpoint"


def save_checkpoint(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str, trusted: bool = False) -> Any:
    """Load a checkpoint on the CPU; errors name the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the first class it would have had to import.
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if needed:
            raise UserError(f"{path}: refused, loading it would import and run '{needed.group(1)}' (arbitrary "
                            f"unpickling); if you trust the file, pass {TRUST_FLAG}") from None
        raise UserError(f"{path}: not a PyTorch checkpoint (unreadable pickle data)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or truncated files
        reason = (str(e).splitlines() or [""])[0][:100]
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from None
