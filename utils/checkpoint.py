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
from typing import Any, List

import torch

from utils.errors import UserError

TRUST_FLAG = "--trust_checkpoint"
TMP_SUFFIX = ".tmp"
# save_checkpoint's temporary files: ".<name>.pth.<random>.tmp"
_PARTIAL = re.compile(r"^\..+\.pth\.\w+" + re.escape(TMP_SUFFIX) + "$")


def save_checkpoint(obj: Any, path: str) -> None:
    """Write `obj` to `path` atomically; a failed write (e.g. a full disk) raises UserError and keeps the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            kept = "the previous file is kept" if os.path.isfile(path) else "nothing was written"
            raise UserError(f"cannot write checkpoint {path} ({e.strerror or e}); {kept}") from None
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
        raise UserError(f"{path}: {_why_unreadable(path, e)}") from None


def _why_unreadable(path: str, error: Exception) -> str:
    """What a file that torch.load cannot read looks like, judged from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    reason = (str(error).splitlines() or [""])[0].split(". ")[0][:100]
    if not head:
        return "empty file, not a checkpoint"
    if head == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or its legacy pickle format
        return f"damaged or incomplete checkpoint (e.g. half-copied): {type(error).__name__}: {reason}"
    return f"not a PyTorch checkpoint (it starts with {head!r}, not with the header torch.save writes)"


def remove_partial_checkpoints(folder: str) -> List[str]:
    """Delete the temporary files that runs killed while writing a checkpoint left in `folder`; returns them."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    removed = [n for n in names if _PARTIAL.match(n)]
    for name in removed:
        os.unlink(os.path.join(folder, name))
    return removed
