"""What TBPS-CLIP's `checkpoint_best.pth` holds beyond torch's weights-only list, allowed in the restricted reader
(utils/safe_unpickle.py): its config is an `easydict.EasyDict` (read as a plain dict) and its optimizer's lr values
are numpy.float64 scalars (read as Python numbers, numeric dtypes only, through `numpy.dtype` and
`_codecs.encode` with latin-1). Each function checks its arguments and builds a plain value; nothing else of
numpy or easydict is reachable.
"""
from __future__ import annotations

import codecs
from typing import Any

import numpy as np

from utils.safe_unpickle import Refused, StandIn, allow, register_build


class AttrDict(dict, StandIn):
    """Stands in for easydict.EasyDict (its attributes mirror its items; they are dropped)."""

    def build(self, state: Any) -> Any:
        return self


def _dtype(*args) -> np.dtype:
    if not args or not isinstance(args[0], str) or not all(isinstance(a, (bool, int)) for a in args[1:]):
        raise Refused(f"refused: numpy.dtype{args!r:.60} (only a dtype named by a string is read)")
    dtype = np.dtype(args[0])
    if dtype.kind not in "biufc" or dtype.subdtype is not None:
        raise Refused(f"refused: the numpy dtype {args[0]!r} (only numeric dtypes are read)")
    return dtype


def _dtype_state(dtype: np.dtype, state: Any) -> np.dtype:
    """numpy's own dtype state: only its byte order is taken (not sizes or flags, which could mis-size it)."""
    if not isinstance(state, tuple) or len(state) != 8 or state[1] not in ("<", ">", "|", "=") or \
            state[2:] != (None, None, None, -1, -1, 0):
        raise Refused(f"refused: the state {state!r:.60} of a numpy dtype")
    return dtype.newbyteorder(state[1])


def _scalar(dtype: Any, data: Any = None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, str)):
        raise Refused(f"refused: a numpy scalar of {dtype!r:.40} (only numbers are read)")
    raw = data.encode("latin1") if isinstance(data, str) else data
    if len(raw) != dtype.itemsize:
        raise Refused(f"refused: a numpy {dtype} scalar of {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, count=1)[0].item()


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"refused: _codecs.encode with the codec {encoding!r:.40} (only latin-1 is read)")
    return codecs.encode(text, encoding)


allow("easydict", "EasyDict", AttrDict)
allow("numpy", "dtype", _dtype)
allow("numpy.core.multiarray", "scalar", _scalar)
allow("numpy._core.multiarray", "scalar", _scalar)
allow("_codecs", "encode", _encode)
register_build(np.dtype, _dtype_state)
