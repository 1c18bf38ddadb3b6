"""Writing files so that a reader, or a crash, never sees half of one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from typing import IO, Callable, Iterator, List, Sequence, Tuple, Union

from utils.errors import UserError

TMP_SUFFIX = ".tmp"
Content = Union[str, bytes, Callable[[IO[bytes]], None]]


def temp_path_beside(path: str) -> str:
    """A new, empty temporary file next to `path`, named `.<name>.<pid>-<8 hex>.tmp` (so a rename is atomic).

    The pid tells `remove_orphan_temps` whether its writer still runs. Created with mode 0o666 less the umask, as
    `open()` would create `path` itself (mkstemp's 0o600 would make a run folder's files unreadable to the rest
    of a group that shares it).
    """
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
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
                 also: Sequence[str] = (), make_folder: bool = False) -> None:
    """Write `content` (text, bytes, or a function writing to a binary file) to `path`, and to each of `also`.

    The data goes to a temporary file beside `path`, which is renamed over `path` only once complete: a kill, a
    full disk or a failing writer leaves the previous files as they were, and the temporary files are removed.
    The copies in `also` (same folder) are hard links to the same data, made before any rename, so either every
    file gets the new data or none does (`also` first, `path` last); where links are not supported they are
    copies. With `fsync` the data and the renames are flushed to disk, so a power loss cannot leave an empty file
    either. Any failure is one UserError line naming `path`. The folder must exist, unless `make_folder`.
    """
    temps = []
    try:
        if make_folder:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


@contextlib.contextmanager
def reading(path: str, kind: str) -> Iterator[None]:
    """Turn what can go wrong reading and parsing a text file of `kind` ("JSON", "YAML") into one UserError line
    naming it: not UTF-8, nested too deeply for the parser, unreadable. (Syntax errors are the parser's own.)"""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start}); expected {kind}") from None
    except RecursionError:
        raise UserError(f"{path}: {kind} nested too deeply to parse") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


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


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: keep the file
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    except (OSError, OverflowError):
        return False
    return True


def remove_orphan_temps(folder: str, names_like: str) -> List[Tuple[str, str]]:
    """Delete the temporary files that writers killed mid-write left in `folder`; returns (path, why) pairs.

    `names_like` is a regular expression for the name of the file a temporary was to become: `<name>` in
    `.<name>.<pid>-<random>.tmp` (temp_path_beside). A file whose pid is alive belongs to a concurrent writer and
    is kept. Call it while this process writes nothing into `folder`: a file named with its own pid is then the
    leftover of an earlier process that had the same pid (a container's processes get the same pids on every
    start).
    """
    pattern = re.compile(rf"^\.(?:{names_like})\.(\d+)-[0-9a-f]+{re.escape(TMP_SUFFIX)}$")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            os.unlink(path)
        except OSError:
            continue  # removed meanwhile by another process, or a read-only folder: nothing to report
        removed.append((path, f"its writer, process {pid}, is gone"))
    return removed


def check_output_dir(path: str, needed_bytes: int = 0) -> None:
    """The run folder exists or can be created, is writable, and its disk has room for `needed_bytes` more.

    Writes nothing, creates nothing: a command that fails later must leave no folder behind.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"output folder {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable ({existing}: {os.strerror(errno.EACCES)})")
    free = shutil.disk_usage(existing).free
    if needed_bytes and free < needed_bytes:
        raise UserError(f"output folder {path} has {free / 2**30:.2f} GiB free but checkpoints need about "
                        f"{needed_bytes / 2**30:.2f} GiB; free some space or set --output_dir elsewhere")
