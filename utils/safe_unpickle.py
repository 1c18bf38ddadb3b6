"""A restricted unpickler: it builds data (numbers, strings, containers, tensors from the archive's storages) and
nothing else, so a file can neither run code nor change anything outside the objects it builds.

It is the pure-Python `pickle._Unpickler` with its opcode table cut down, as torch's weights-only unpickler is:
- a global resolves only through `ALLOWED` (torch's tensor layout, `OrderedDict`, `torch.Size`, `torch.device`,
  and what a published layout adds with `allow`), always to a checked function or a constructor that builds a
  value; never to an object a file could then modify;
- REDUCE calls only those; NEWOBJ makes only stand-ins (a `StandIn` class allowed by name, a `ScriptObject` per
  TorchScript class); BUILD sets state only on them (their `build`), on the types a layout registers a checked
  state for (`register_build`) and `_metadata` on an `OrderedDict`, as torch's state dicts carry; INST, OBJ,
  NEWOBJ_EX, EXT*, out-of-band buffers and text persistent ids are refused;
- APPEND / SETITEM / ADDITEMS fill only a list, a dict or a set;
- the memo is a dict bounded by the size of the pickle (a genuine pickler numbers its memo entries from 0, one
  opcode each), so a six-byte `LONG_BINPUT 2**30` costs nothing;
- a tensor is a view of one of the archive's storages (`tensor_archive`), its offset, sizes and strides inside
  it and no larger than it (no zero-stride view of a terabyte), without metadata bits (neg, conj) or hooks.
Every refusal is a `Refused` (an UnpicklingError) that names what was refused.

A method whose published checkpoints hold a few harmless types beyond torch's weights-only list allows them here
beside its layout (methods/tbps/checkpoint.py: an EasyDict config and numpy scalars).
"""
from __future__ import annotations

import collections
import math
import pickle
import pickletools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch


class Refused(pickle.UnpicklingError):
    """The pickle asks for something the restricted unpickler does not do; the message names it."""


class StandIn:
    """A type NEWOBJ may make in place of a pickled class, allowed by name (`allow`); BUILD gives it its state."""

    def build(self, state: Any) -> Any:
        """Take the pickled state; returns the object that stands on the stack from then on."""
        raise Refused(f"refused: setting the state of {type(self).__name__!r:.60}")


@dataclass(frozen=True)
class Stored:
    """One storage of a tensor archive, as a persistent id names it (utils/tensor_archive.py reads them)."""
    untyped: torch.UntypedStorage
    dtype: torch.dtype
    numel: int


class ScriptObject(StandIn):
    """Stands in for an object of a TorchScript class (`__torch__.*`): its pickled state, never its code."""

    qualified_name = ""

    def __init__(self) -> None:
        self.state: Any = None

    def build(self, state: Any) -> Any:
        if self.state is not None:
            raise Refused(f"refused: setting the state of {self.qualified_name!r:.60} twice")
        self.state = state
        return self


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > 64 or not all(type(v) is int and v >= 0 for v in value):
        raise Refused(f"refused: a tensor whose {what} is {value!r:.60} (non-negative integers expected)")
    return value


def _no_extras(hooks: Any, metadata: Any = None) -> None:
    if hooks or metadata:  # a hook or a metadata bit (neg, conj) would make a tensor behave unlike its data
        raise Refused("refused: a tensor with backward hooks or metadata bits")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2's layout, checked: the view lies inside its storage and is not larger."""
    if not isinstance(storage, Stored):
        raise Refused("refused: a tensor whose storage is not one of the archive's")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or not isinstance(requires_grad, bool):
        raise Refused(f"refused: a tensor with offset {offset!r:.30}, size {size} and stride {stride}")
    _no_extras(hooks, metadata)
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if numel > storage.numel or last >= storage.numel:
        raise Refused(f"refused: a tensor of size {list(size)} (offset {offset}, stride {list(stride)}) outside or "
                      f"larger than its storage of {storage.numel} elements")
    tensor = torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, offset, size, stride)
    tensor.requires_grad_(requires_grad and tensor.is_floating_point())
    return tensor


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
    if not torch.is_tensor(data) or not isinstance(requires_grad, bool):
        raise Refused("refused: a parameter that does not hold a tensor")
    _no_extras(hooks)
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _ordered_dict(*args) -> collections.OrderedDict:
    if args:
        raise Refused("refused: OrderedDict with arguments")
    return collections.OrderedDict()


def _size(*args) -> torch.Size:
    if len(args) != 1:
        raise Refused("refused: torch.Size with other arguments than a tuple")
    return torch.Size(_ints(tuple(args[0]) if isinstance(args[0], (tuple, list)) else args[0], "size"))


def _device(*args) -> torch.device:
    if not args or len(args) > 2 or not isinstance(args[0], str) or not all(type(a) is int for a in args[1:]):
        raise Refused(f"refused: torch.device{args!r:.40}")
    return torch.device(*args)


def _same(value: Any, *_) -> Any:
    """torch.jit._pickle's list builders and type tags: the value they are given."""
    return value


ALLOWED: Dict[Tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
}
SCRIPT_HELPERS = {("torch.jit._pickle", name): _same for name in (
    "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_list", "restore_type_tag")}
# The globals beyond the weights-only loader's that this module reads (what makes a refused file worth a retry).
EXTRA: set = set()
_CALLABLE = set(ALLOWED.values()) | {_same}
# type -> checked BUILD of its state: (the object, the state) -> the object that stands from then on
BUILDS: Dict[type, Callable[[Any, Any], Any]] = {}


def allow(module: str, name: str, fn: Callable) -> None:
    """Let the global `module.name` resolve to `fn`: a function that checks its arguments and builds a plain
    value, or a StandIn class. For a published layout's harmless types; never torch's own functions."""
    ALLOWED[(module, name)] = fn
    EXTRA.add(f"{module}.{name}")
    _CALLABLE.add(fn)


def register_build(kind: type, fn: Callable[[Any, Any], Any]) -> None:
    """Let BUILD give an object of `kind` (made by an allowed function) its state, through `fn`'s checks."""
    BUILDS[kind] = fn


class StorageType:
    """What a pickled `torch.<X>Storage` global stands for: the dtype of the storage's elements."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


STORAGE_TYPES = {name: StorageType(dtype) for name, dtype in (
    ("DoubleStorage", torch.float64), ("FloatStorage", torch.float32), ("HalfStorage", torch.float16),
    ("BFloat16Storage", torch.bfloat16), ("LongStorage", torch.int64), ("IntStorage", torch.int32),
    ("ShortStorage", torch.int16), ("CharStorage", torch.int8), ("ByteStorage", torch.uint8),
    ("BoolStorage", torch.bool), ("ComplexDoubleStorage", torch.complex128),
    ("ComplexFloatStorage", torch.complex64), ("UntypedStorage", torch.uint8))}


_OPCODES = {op.name: op.code.encode("latin1")[0] for op in pickletools.opcodes}


class Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The restricted unpickler (see the module's docstring). `persistent_load` is set by the archive reader;
    `script` lets `__torch__.*` globals through as ScriptObject classes (a TorchScript archive's data)."""

    def __init__(self, file, size: int, persistent_load: Optional[Callable] = None, script: bool = False) -> None:
        super().__init__(file, encoding="utf-8")
        self.memo_limit = max(size, 16)
        self.loader = persistent_load
        self.script = script
        self.script_classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name)) or (SCRIPT_HELPERS.get((module, name)) if self.script else None)
        if found is not None:
            return found
        if module == "torch" and name in STORAGE_TYPES:
            return STORAGE_TYPES[name]
        if self.script and (module == "__torch__" or module.startswith("__torch__.")):
            key = f"{module}.{name}"
            if key not in self.script_classes:
                self.script_classes[key] = type(name, (ScriptObject,), {"qualified_name": key})
            return self.script_classes[key]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if self.loader is None or not isinstance(pid, tuple):
            raise Refused(f"refused: a persistent id {pid!r:.60} outside a tensor archive")
        return self.loader(pid)

    # ------------------------------------------------------------------ opcodes that call, make or fill objects
    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in _CALLABLE) or not isinstance(args, tuple):
            raise Refused(f"refused: calling {getattr(func, '__name__', type(func).__name__)!r:.60}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        standing = isinstance(cls, type) and issubclass(cls, StandIn) and (cls in _CALLABLE or
                                                                            issubclass(cls, ScriptObject))
        if not standing or args != ():
            raise Refused(f"refused: making an object of {getattr(cls, '__name__', type(cls).__name__)!r:.60}")
        self.append(cls())

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, StandIn):
            self.stack[-1] = inst.build(state)
            return
        if type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            inst.__dict__.update(state)  # a state dict's per-module versions, as torch writes them
            return
        build = next((fn for kind, fn in BUILDS.items() if isinstance(inst, kind)), None)
        if build is None:
            raise Refused(f"refused: setting the state of {type(inst).__name__!r:.60}")
        self.stack[-1] = build(inst, state)

    def _target(self, kinds: Tuple[type, ...], what: str) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kinds):
            raise Refused(f"refused: {what} on {type(target).__name__!r:.60}")
        return target

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target((dict,), "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target((dict,), "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(items)

    def _memo_put(self, index: int) -> None:
        if index < 0 or index >= self.memo_limit:
            raise Refused(f"refused: memo index {index} in a pickle of {self.memo_limit} bytes")
        self.memo[index] = self.stack[-1]

    def load_put(self) -> None:
        self._memo_put(int(self.readline()[:-1]))

    def load_binput(self) -> None:
        self._memo_put(self.read(1)[0])

    def load_long_binput(self) -> None:
        self._memo_put(int.from_bytes(self.read(4), "little"))

    def load_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def refuse(self) -> None:
        raise Refused("refused: a pickle opcode this reader does not run (INST, OBJ, NEWOBJ_EX, EXT, out-of-band "
                      "buffers or a text persistent id)")

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]


for _name, _method in (("REDUCE", Unpickler.load_reduce), ("NEWOBJ", Unpickler.load_newobj),
                       ("BUILD", Unpickler.load_build), ("APPEND", Unpickler.load_append),
                       ("APPENDS", Unpickler.load_appends), ("SETITEM", Unpickler.load_setitem),
                       ("SETITEMS", Unpickler.load_setitems), ("ADDITEMS", Unpickler.load_additems),
                       ("PUT", Unpickler.load_put), ("BINPUT", Unpickler.load_binput),
                       ("LONG_BINPUT", Unpickler.load_long_binput), ("MEMOIZE", Unpickler.load_memoize),
                       ("INST", Unpickler.refuse), ("OBJ", Unpickler.refuse), ("NEWOBJ_EX", Unpickler.refuse),
                       ("EXT1", Unpickler.refuse), ("EXT2", Unpickler.refuse), ("EXT4", Unpickler.refuse),
                       ("NEXT_BUFFER", Unpickler.refuse), ("READONLY_BUFFER", Unpickler.refuse),
                       ("PERSID", Unpickler.refuse)):
    Unpickler.dispatch[_OPCODES[_name]] = _method


def plain(obj: Any, depth: int = 0) -> Any:
    """`obj` with every stand-in dict made a plain dict, recursively through dicts, lists and tuples."""
    if depth > 200:
        raise Refused("refused: data nested more than 200 levels deep")
    if isinstance(obj, collections.OrderedDict):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v, depth + 1) for v in obj)
    return obj
