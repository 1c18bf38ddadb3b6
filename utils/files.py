"""Writing files so that a reader, or a crash, never sees half of one."""
from __future__ import annotations

import os
import secrets
import shutil
from typing import IO, Callable, Sequence, Union

from utils.errors import UserError

TMP_SUFFIX = ".tmp"
Content = Union[str, bytes, Callable[[IO[bytes]], None]]


def temp_path_beside(path: str) -> str:
    """A new, empty temporary file next to `path`, named `.<name>.<random>.tmp` (so a rename is atomic).

    Created with mode 0o666 less the umask, as `open()` would create `path` itself (mkstemp's 0o600 would make
    a run folder's files unreadable to the rest of a group that shares it).
    """
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write(tmp: str, content: Content, fsync: bool) -> None:
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_atomic(path: str, content: Content, fsync: bool = False, what: str = "file",
                 also: Sequence[str] = ()) -> None:
    """Write `content` (text, bytes, or a function writing to a binary file) to `path`, and to each of `also`.

    The data goes to a temporary file beside `path`, which is renamed over `path` only once complete: a kill, a
    full disk or a failing writer leaves the previous files as they were, and the temporary files are removed.
    The copies in `also` (same folder) are hard links to the same data, made before any rename, so either every
    file gets the new data or none does (`also` first, `path` last); where links are not supported they are
    copies. With `fsync` the data and the renames are flushed to disk, so a power loss cannot leave an empty file
    either. Any failure is one UserError line naming `path`. The folder must exist.
    """
    temps = []
    try:
        temps.append(temp_path_beside(path))
        _write(temps[0], content, fsync)
        for other in also:
            copy = temp_path_beside(other)
            temps.append(copy)
            os.unlink(copy)
            try:
                os.link(temps[0], copy)
            except OSError:
                shutil.copyfile(temps[0], copy)
        for tmp, target in reversed(list(zip(temps, [path, *also]))):
            os.replace(tmp, target)
        temps = []
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError ("PytorchStreamWriter failed writing file ...").
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot write {what} {path} ({reason}); {kept}") from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if fsync:
        sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk; not every platform or file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
