"""Provenance: which code, checkpoint, config and annotations a number came from, so a reviewer can check it.

`git_state` says which commit the code is and whether the checkout differs from it; `sha256_file` identifies a
file by content (a path says nothing once the file is replaced); `code_and_data` is what training records per
epoch, `evaluation_provenance` what every result of test.py carries. None of it ever fails a command: without
git, or outside a checkout, the commit and the dirty flag are None (null in JSON).
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from typing import Optional, Sequence, Tuple

import torch

from utils.errors import UserError
from utils.plugins import plugin_hashes

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# git answers in milliseconds; a hung network file system must not hold up a training run or a test.
GIT_TIMEOUT_S = 5.0


def _git(path: str, *args: str) -> Optional[str]:
    """stdout of `git -C path args`, or None when git is missing, fails or takes too long."""
    # No optional locks: a status refresh would otherwise take .git/index.lock and could make a concurrent
    # `git commit` in the same checkout fail.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        done = subprocess.run(["git", "-C", path, *args], capture_output=True, timeout=GIT_TIMEOUT_S, env=env,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    # Bytes, not text: a file name that is not UTF-8 must not turn a dirty checkout into an unknown one.
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def git_state(path: str = PROJECT_ROOT) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git checkout holding `path`: HEAD's full hash, and whether the working tree differs
    from it; (None, None) outside a checkout, without git, or when git does not answer in time.

    Untracked files that git does not ignore count as dirty: a plug-in file beside the code is code that the
    commit does not hold. (The dirty flag is None when only the status fails.)
    """
    head = _git(path, "rev-parse", "--verify", "--quiet", "HEAD")
    if not head or not head.strip():
        return None, None
    # --untracked-files=normal overrides a user's status.showUntrackedFiles=no, which would hide them.
    status = _git(path, "status", "--porcelain", "--untracked-files=normal")
    return head.strip(), (None if status is None else bool(status.strip()))


def sha256_file(path: str) -> str:
    """Hex SHA-256 of the file at `path`, read in chunks (checkpoints do not fit in memory twice); an unreadable
    file is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise UserError(f"cannot read {path} to record its SHA-256 ({e.strerror or e})") from None


def utc_now() -> str:
    """The current time in ISO 8601, UTC, to the second ("2025-01-31T12:00:00+00:00")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def open_clip_version() -> Optional[str]:
    module = sys.modules.get("open_clip")
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def code_and_data(annotation_file: Optional[str], plugins: Sequence[str] = (), root: str = PROJECT_ROOT) -> dict:
    """`commit`, `dirty` (see git_state, of the project at `root`), `annotations_sha256` (None when the data did
    not come from a file) and `plugins_sha256` ({file: sha256} of the custom_imports entries `plugins`)."""
    commit, dirty = git_state(root)
    return {"commit": commit, "dirty": dirty,
            "annotations_sha256": sha256_file(annotation_file) if annotation_file else None,
            "plugins_sha256": plugin_hashes(plugins)}


def evaluation_provenance(*, checkpoint: str, config: str, annotation_file: Optional[str], device, precision: str,
                          seconds: float, plugins: Sequence[str] = (), root: str = PROJECT_ROOT) -> dict:
    """The `provenance` object of an evaluation result: the code (commit, dirty, plug-in files), the checkpoint,
    config and annotation files by content, the library versions, device and precision, when it finished (`date`)
    and how long it took (`seconds`)."""
    record = code_and_data(annotation_file, plugins, root)
    return {"commit": record["commit"], "dirty": record["dirty"], "plugins_sha256": record["plugins_sha256"],
            "checkpoint_sha256": sha256_file(checkpoint),
            "config_sha256": sha256_file(config), "annotations_sha256": record["annotations_sha256"],
            "torch": str(torch.__version__), "open_clip": open_clip_version(), "device": str(device),
            "precision": precision, "date": utc_now(), "seconds": round(float(seconds), 3)}
