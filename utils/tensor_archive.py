"""Reading a torch zip archive without running anything in it: torch.save's format, and TorchScript's.

`load(path)` reads a torch.save archive through the restricted unpickler of utils/safe_unpickle.py, its tensors
views of the archive's own storages (each record's size checked against what the pickle says). It serves
the files torch's weights-only loader refuses only for the few harmless types that unpickler also reads (a
TBPS-CLIP checkpoint's EasyDict config and numpy scalars).

`script_state_dict(path)` reads a TorchScript archive (OpenAI's `ViT-B-16.pt` is one) as a state dict without
loading it as TorchScript: `torch.jit.load` would run the archive's code (a class's `__setstate__` runs on load).
Here its `data.pkl` is unpickled with every `__torch__` class as an inert stand-in, and the tensors of each
module are those its class declares in `__parameters__` / `__buffers__` (read as text from the archive's code,
never run): the keys `state_dict()` would give.
"""
from __future__ import annotations

import ast
import io
import os
import re
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from utils.safe_unpickle import Refused, ScriptObject, StorageType, Stored, Unpickler, plain

_KEY = re.compile(r"\w{1,64}")
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t].*(?:\n|$))*)", re.M)
_DECLARED = re.compile(r"^\s+__(?:parameters|buffers)__ = (\[.*\])\s*$", re.M)


_CHUNK = 32 * 2 ** 20  # bytes per positioned read: big storages are split so the threads share them evenly


class _Storages:
    """The persistent_load of an archive: ('storage', <X>Storage, key, location, numel) -> Stored, each record
    read once (views share it), on the CPU whatever location it names.

    A storage is allocated when the pickle names it and filled after the pickle is read (`fill`): each stored
    (uncompressed) record straight from the file into its storage by positioned reads on a few threads (they
    release the GIL), one copy as torch's reader makes, on several cores; other records through torch's reader.
    """

    def __init__(self, reader: Any, file: Any) -> None:
        self.reader, self.file = reader, file
        self.cache: Dict[str, torch.UntypedStorage] = {}
        self.pending: List[Tuple[torch.UntypedStorage, int, int, torch.dtype]] = []
        order = reader.get_record("byteorder").decode() if reader.has_record("byteorder") else sys.byteorder
        self.swap = order != sys.byteorder
        file.seek(0)
        with zipfile.ZipFile(file) as z:  # names without the archive's folder, as torch's reader gives them
            self.plain = {info.filename.split("/", 1)[-1] for info in z.infolist()
                          if info.compress_type == zipfile.ZIP_STORED and info.file_size == info.compress_size}

    def __call__(self, pid: Any) -> Stored:
        if len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], StorageType):
            raise Refused(f"refused: the persistent id {pid!r:.80}")
        kind, key, location, numel = pid[1:]
        if not isinstance(key, str) or not _KEY.fullmatch(key) or not isinstance(location, str) or \
                type(numel) is not int or numel < 0:
            raise Refused(f"refused: the storage id {pid[1:]!r:.80}")
        name = f"data/{key}"
        if not self.reader.has_record(name):
            raise Refused(f"refused: storage {key!r} is not in the archive")
        nbytes, size = numel * kind.dtype.itemsize, self.reader.get_record_size(name)
        if nbytes != size:
            raise Refused(f"refused: storage {key!r} holds {size} bytes, the pickle says {numel} elements of "
                          f"{kind.dtype}")
        if key not in self.cache:
            if name in self.plain and hasattr(os, "preadv"):
                untyped = torch.UntypedStorage(nbytes)
                self.pending.append((untyped, self.reader.get_record_offset(name), nbytes, kind.dtype))
            else:
                untyped = self.reader.get_storage_from_record(name, nbytes, torch.UntypedStorage).untyped_storage()
                if self.swap:
                    untyped.byteswap(kind.dtype)
            self.cache[key] = untyped
        return Stored(self.cache[key], kind.dtype, numel)

    def fill(self) -> None:
        """Read the storages allocated while unpickling."""
        chunks = [(storage, offset, start, min(_CHUNK, nbytes - start))
                  for storage, offset, nbytes, _ in self.pending for start in range(0, nbytes, _CHUNK)]
        threads = max(1, min(4, torch.get_num_threads(), len(chunks)))
        with ThreadPoolExecutor(threads, thread_name_prefix="read-storages") as pool:
            for _ in pool.map(self._read_chunk, chunks):
                pass
        if self.swap:
            for storage, _, _, dtype in self.pending:
                storage.byteswap(dtype)

    def _read_chunk(self, chunk: Tuple[torch.UntypedStorage, int, int, int]) -> None:
        storage, offset, start, length = chunk
        view = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())[start:start + length]
        done = 0
        while done < length:
            read = os.preadv(self.file.fileno(), [view[done:]], offset + start + done)
            if read <= 0:
                raise Refused("refused: the archive ends inside a storage (truncated)")
            done += read


def _open(path: str) -> Any:
    return torch._C.PyTorchFileReader(path)


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (as torch.load decides: it has constants.pkl)."""
    try:
        return "constants.pkl" in _open(path).get_all_records()
    except RuntimeError:
        return False


def _unpickle(path: str, script: bool) -> Tuple[Any, Dict[str, bytes]]:
    """(the object of the archive's data.pkl, with `script` the text of its code files by record name)."""
    with open(path, "rb") as file:
        reader = torch._C.PyTorchFileReader(file)
        records = reader.get_all_records()
        if "constants.pkl" in records and not script:
            raise Refused("refused: a TorchScript archive (a model with code), not a checkpoint")
        data = reader.get_record("data.pkl")
        storages = _Storages(reader, file)
        obj = Unpickler(io.BytesIO(data), len(data), storages, script=script).load()
        storages.fill()
        code = {r: reader.get_record(r) for r in records if script and r.startswith("code/") and r.endswith(".py")}
    return obj, code


def load(path: str) -> Any:
    """A torch.save zip archive's object, read by the restricted unpickler (stand-in dicts made plain)."""
    return plain(_unpickle(path, script=False)[0])


def _declared_tensors(code: Dict[str, bytes]) -> Dict[str, Set[str]]:
    """{'__torch__.<module>.<Class>': the names its code declares as parameters and buffers}, parsed as text."""
    declared: Dict[str, Set[str]] = {}
    for record, text in code.items():
        module = record[len("code/"):-len(".py")].replace("/", ".")
        for name, body in _CLASS.findall(text.decode("utf-8", "replace")):
            names: Set[str] = set()
            for listed in _DECLARED.findall(body):
                try:
                    names.update(n for n in ast.literal_eval(listed) if isinstance(n, str))
                except (ValueError, SyntaxError):
                    continue
            declared[f"{module}.{name}"] = names
    return declared


def script_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive's module tree, by their state_dict names."""
    root, code = _unpickle(path, script=True)
    if not isinstance(root, ScriptObject):
        raise Refused("refused: a TorchScript archive whose data is not a module")
    declared = _declared_tensors(code)
    found: Dict[str, torch.Tensor] = {}
    pending = [("", root, 0)]
    while pending:
        prefix, obj, depth = pending.pop()
        if depth > 64 or not isinstance(obj.state, dict):
            continue  # a custom __getstate__'s state is not a module's attributes
        names: Optional[Set[str]] = declared.get(obj.qualified_name)
        for attr, value in obj.state.items():
            if not isinstance(attr, str):
                continue
            if torch.is_tensor(value) and (names is None or attr in names):
                found[prefix + attr] = value.detach()
            elif isinstance(value, ScriptObject):
                pending.append((f"{prefix}{attr}.", value, depth + 1))
    return found
