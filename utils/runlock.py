"""One writer per run folder: a lock file held for as long as a process writes into the folder.

`<run>/.lock` holds a POSIX record lock (fcntl F_SETLK), which the kernel releases when its holder ends, however
it ends (a SIGKILL, a crash, a power loss): a lock can never outlive its process. (Not flock(2): its locks are
shared with forked children, so data-loader workers outliving a killed trainer for a moment would keep its lock.) The file also records who holds it
(pid, host, command, start time), so a refused process can say which one to wait for; a clean release removes
it, so a lock file whose recorded holder no longer holds the lock was left by a killed process, and taking over
says so. On a shared file
system the lock works across machines where the file system supports POSIX locks (NFS, Lustre, GPFS do).
"""
from __future__ import annotations

import datetime
import errno
import logging
import os
import socket
import sys
from typing import Dict, Optional

from utils.errors import UserError

LOCK_NAME = ".lock"
logger = logging.getLogger("php")

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; the folder is not locked
    fcntl = None

# Locks this process holds, by real folder path: an entry point called by another one in the same process
# (run.sh's job runner calling train and test) takes the lock again without waiting for itself.
_HELD: Dict[str, "RunLock"] = {}


class FolderBusy(UserError):
    """The run folder's lock is held by another process."""


class RunLock:
    """`with RunLock(folder, "train.py"):` holds the folder's lock, creating the folder if needed."""

    def __init__(self, folder: str, purpose: str):
        self.folder = folder
        self.purpose = purpose
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None
        self._outermost = False

    def __enter__(self) -> "RunLock":
        key = os.path.realpath(self.folder)
        # Within a process that holds the lock already, only the outermost holder acquires and releases it.
        self._outermost = key not in _HELD
        if self._outermost:
            self.acquire()
            _HELD[key] = self
        return self

    def __exit__(self, *exc) -> None:
        if self._outermost:
            _HELD.pop(os.path.realpath(self.folder), None)
            self.release()

    def acquire(self) -> None:
        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.path} ({e.strerror or e})") from None
            if fcntl is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        os.close(fd)
                        raise UserError(f"cannot lock {self.path} ({e.strerror or e}); the file system may not "
                                        f"support locks") from None
                    holder = _read(fd)
                    os.close(fd)
                    raise FolderBusy(f"run folder {self.folder} is in use by {holder or 'another process'}; wait for "
                                     f"it to finish (one process writes a run folder at a time)") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder released (and removed) the file between our open and our lock: try again
        previous = _read(fd)
        if previous:
            logger.warning("run folder %s: taking over the lock of %s, which ended without releasing it (killed?)",
                           self.folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _describe(self.purpose).encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so a process that opens the path later gets a new file; a lock file that
        # remains with a holder recorded in it was left by a process that died holding it.
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _describe(purpose: str) -> str:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{purpose} (pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {started})"


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
