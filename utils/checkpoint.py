"""Checkpoint files: crash-safe writes and safe reads.

Writes go to a temporary file in the same folder, are flushed to disk (fsync), then renamed over the target, so
a run killed at any moment leaves either the old or the new file, never a torn one. Reads use
`torch.load(weights_only=True)`: a file that needs arbitrary unpickling is refused, never executed, unless the
caller opts in for a trusted file.

A checkpoint of this project also carries a CRC-32 of every weight of its model (`weights_crc32`, computed when it
is written), and a read verifies them: a file damaged later (a flipped bit on a disk, an edited tensor) is one
line naming the file and the weight, never a silently different model. Files without them (published
checkpoints, or this project's of earlier versions) load as before.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
import warnings
from typing import Any, Dict, List, Sequence

import torch

from utils import safe_unpickle, tensor_archive

from utils.errors import UserError
from utils.files import remove_orphan_temps, write_atomic
from utils.plugins import load_methods

TRUST_FLAG = "--trust_checkpoint"
CHECKSUMS = "weights_crc32"
# The files save_checkpoint writes (their temporaries are ".<name>.pth.<pid>-<random>.tmp").
_CHECKPOINT_NAMES = r".+\.pth"


def save_checkpoint(obj: Any, path: str, also: Sequence[str] = ()) -> None:
    """Write `obj` to `path` (and the same data to each of `also`) atomically and durably.

    A failed write (a full disk, which torch reports as RuntimeError, a read-only folder) raises one UserError
    line, keeps every previous file and removes the partial one; see utils.files.write_atomic.
    """
    write_atomic(path, lambda f: torch.save(obj, f), fsync=True, what="checkpoint", also=also)


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in row-major order (any dtype)."""
    return zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def weight_checksums(state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """{name: CRC-32} of every tensor of a state dict (about 0.1 s per GB on one core)."""
    return {name: tensor_crc32(value) for name, value in state_dict.items() if torch.is_tensor(value)}


def verify_weights(ckpt: Any, path: str) -> None:
    """Check the model weights of a checkpoint against the checksums written with it (when it has them)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(CHECKSUMS), dict) or not isinstance(ckpt.get("model"),
                                                                                                   dict):
        return
    recorded, state = ckpt[CHECKSUMS], ckpt["model"]
    if set(recorded) != set(k for k, v in state.items() if torch.is_tensor(v)):
        missing = sorted(set(recorded) ^ set(state))[:3]
        raise UserError(f"{path}: damaged checkpoint: its weights and their checksums do not list the same tensors "
                        f"({', '.join(missing)}); the file was modified after it was written")
    for name, crc in recorded.items():
        if tensor_crc32(state[name]) != crc:
            raise UserError(f"{path}: damaged checkpoint: weight {name} does not match the checksum written with it "
                            f"(the file was modified or corrupted after it was saved); use another copy or retrain")


def verify_in_background(ckpt: Any, path: str) -> Future:
    """verify_weights in a thread (CRC-32 releases the GIL): a caller builds its model meanwhile and calls
    `.result()` before using the weights, which raises the UserError of a damaged file."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-weights")
    try:
        return pool.submit(verify_weights, ckpt, path)
    finally:
        pool.shutdown(wait=False)


def read_checkpoint(path: str, trusted: bool = False, verify: bool = True, torchscript: bool = False) -> Any:
    """Load a checkpoint on the CPU, its weights verified against their checksums when it has them (unless
    `verify` is off: the caller verifies, see verify_in_background); errors name the file and what is wrong.
    With `torchscript`, a TorchScript archive is read too, as its state dict, without running its code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        if torchscript and tensor_archive.is_torchscript(path):
            ckpt = tensor_archive.script_state_dict(path)
        else:
            ckpt = _load(path, trusted)
        if not trusted:
            check_tensor_sizes(ckpt)
    except safe_unpickle.Refused as e:
        raise UserError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the first class it would have had to import.
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if needed:
            raise UserError(f"{path}: refused, loading it would import and run '{needed.group(1)}' (arbitrary "
                            f"unpickling); if you trust the file, pass {TRUST_FLAG}") from None
        raise UserError(f"{path}: {_what_pickle_needs(path)}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or truncated files
        raise UserError(f"{path}: {_why_unreadable(path, e)}") from None
    if verify:
        verify_weights(ckpt, path)
    return ckpt


def _load(path: str, trusted: bool) -> Any:
    """torch.load on the CPU: weights only unless `trusted`; a zip archive refused only for the harmless types
    that a method lets utils/safe_unpickle.py read (safe_unpickle.allow) is read
    again by utils/tensor_archive.py, with those types as plain ones. torch's legacy (pre-zip) format is never
    read that way: it is refused, as every path that could unpickle it beyond torch's weights-only loader."""
    with warnings.catch_warnings():
        # A plain pickle.dump file makes torch warn about its protocol before refusing it; the refusal says it.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as e:
            needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            load_methods()  # a method's layout allows its published checkpoints' few extra types
            if trusted or needed is None or needed.group(1) not in safe_unpickle.EXTRA:
                raise
    if not zipfile.is_zipfile(path):
        raise safe_unpickle.Refused(
            f"refused: a checkpoint in torch's legacy (pre-1.6) format that needs '{needed.group(1)}', which only "
            f"full unpickling reads in that format; re-save it with torch.save in a session you trust, or pass "
            f"{TRUST_FLAG} if you trust the file")
    return tensor_archive.load(path)


def check_tensor_sizes(obj: Any) -> None:
    """Refuse a tensor larger than its storage (a zero-stride view): any later copy of it would allocate what
    the file never held, so a few bytes could ask for terabytes."""
    pending, seen = [obj], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > 10_000_000:
            raise safe_unpickle.Refused("refused: more than 10 million objects")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif torch.is_tensor(item) and item.numel() and not item.is_sparse and \
                item.numel() * item.element_size() > item.untyped_storage().nbytes():
            raise safe_unpickle.Refused(f"refused: a tensor of size {list(item.shape)} over a storage of "
                                        f"{item.untyped_storage().nbytes()} bytes (a view larger than its data)")


def _what_pickle_needs(path: str) -> str:
    """Why the safe loader refused a file: the code a full unpickling would import, read from its opcodes
    without running them (a plain `pickle.dump` file uses opcodes the safe loader does not read at all)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            names = _pickle_globals(f) if head[:1] == b"\x80" else []
    except Exception:  # noqa: BLE001 - a torn pickle: what it would import is unknown, the refusal stands
        names = []
    if names:
        return (f"refused, loading it would import and run '{names[0]}' (arbitrary unpickling); if you trust the "
                f"file, pass {TRUST_FLAG}")
    if head[:1] == b"\x80":
        return (f"a Python pickle (protocol {head[1]}) that the safe loader cannot read, not a file written by "
                f"torch.save; loading it needs full unpickling, which can run code: if you trust the file, pass "
                f"{TRUST_FLAG}")
    return "not a PyTorch checkpoint (unreadable pickle data)"


def _pickle_globals(f) -> List[str]:
    """'module.name' of every global a pickle stream refers to (GLOBAL / STACK_GLOBAL), without unpickling."""
    found, strings = [], []
    for opcode, arg, _ in pickletools.genops(f):
        if opcode.name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


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
    """Delete the temporary files that runs killed while writing a checkpoint left in `folder`; returns their names.

    The temporary file of a writer that still runs is kept.
    """
    removed = remove_orphan_temps(folder, _CHECKPOINT_NAMES)
    return [os.path.basename(path) for path, _ in removed]
