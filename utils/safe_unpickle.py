"""Reading checkpoints that torch's weights-only loader refuses only for a few harmless types, without arbitrary
unpickling: an unpickler that resolves an allow-list of globals and nothing else.

TBPS-CLIP's `checkpoint_best.pth` (SPEC 13) holds its config as an `easydict.EasyDict` (a dict subclass, which
the weights-only loader cannot fill) and its optimizer's per-group lr as numpy.float64 scalars. Here:
- `easydict.EasyDict` is rebuilt as a plain dict (nested ones too);
- a numpy scalar (`numpy.core.multiarray.scalar` / `numpy._core.multiarray.scalar`, with `numpy.dtype` and the
  `_codecs.encode` of its bytes) becomes the Python number it holds, for numeric dtypes only;
- torch's own tensor and storage rebuilding, `collections.OrderedDict` and `torch.device` resolve as in torch.
Any other global is refused with an UnpicklingError naming it, before anything of it runs.

`torch.load(path, weights_only=False, pickle_module=utils.safe_unpickle)` uses it: torch then unpickles through
this module's `Unpickler` (its `find_class` is the only way a pickle reaches code), never through `pickle`'s.
"""
from __future__ import annotations

import codecs
import collections
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

load = pickle.load  # torch.load checks that the module has these
dump = pickle.dump


class _AttrDict(dict):
    """Stands in for easydict.EasyDict while unpickling (its attributes mirror its items; they are dropped)."""

    def __setstate__(self, state) -> None:
        pass


def _dtype(*args) -> np.dtype:
    kind = np.dtype(args[0]).kind if args else "O"
    if kind not in "biufc":
        raise pickle.UnpicklingError(f"refused: a numpy dtype of kind {kind!r} (only numbers are read)")
    return np.dtype(*args)


def _scalar(dtype: np.dtype, data: Any = None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, str)):
        raise pickle.UnpicklingError("refused: a numpy scalar that is not a number")
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype, count=1)[0].item()


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with {encoding!r}")
    return codecs.encode(text, encoding)


ALLOWED: Dict[Tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("easydict", "EasyDict"): _AttrDict,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _encode,
}
# The globals beyond the weights-only loader's that this module reads (what makes a refused file worth a retry).
EXTRA = {f"{m}.{n}" for m, n in ALLOWED if m in ("easydict", "numpy", "numpy.core.multiarray",
                                                  "numpy._core.multiarray", "_codecs")}


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return found


def plain(obj: Any) -> Any:
    """`obj` with every stand-in dict made a plain dict, recursively through dicts, lists and tuples."""
    if isinstance(obj, _AttrDict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, collections.OrderedDict):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj
