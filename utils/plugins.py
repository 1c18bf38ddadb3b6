"""`custom_imports`: the user's own Python files (or modules), imported before a run is built.

A plug-in file registers heads, losses and data sets with the decorators of model/registry.py and
datasets/registry.py, and declares its options with them; nothing of the project is edited. Entries are file
paths, looked up relative to the current folder and then to the folder of the config file that names them, or
importable module names (`my_package.losses`). A file is imported once per process, as a module named after it;
the options it declared are remembered, so that every config naming it gets them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Sequence

from utils.errors import UserError, short_repr
from utils.schema import Option, register_options

# The plug-in being imported: the registries record it as the owner of what it declares.
_importing: List[str] = []
# entry (absolute file path or module name) -> the plug-in options it declared
_DECLARED: Dict[str, List[str]] = {}


def declare(registry: Dict[str, Any], kind: str, name: str, module: str, options: Sequence[Option]) -> str:
    """What every registry does first on a registration of `name` from `module`: returns its owner (the
    custom_imports entry being imported right now, else `module`), after refusing a name that another owner
    registered (a ValueError: a programming error, reported when the plug-in is imported) and adding `options` to
    the schema, remembered for the entry that declared them."""
    owner = _importing[-1] if _importing else module
    previous = registry.get(name)
    if previous is not None and previous.owner != owner:
        raise ValueError(f"{kind} {name!r} of {owner} is already registered by {previous.owner}")
    names = register_options(options, owner)
    if _importing:
        declared = _DECLARED.setdefault(_importing[-1], [])
        declared.extend(n for n in names if n not in declared)
    return owner


def import_plugins(entries: Sequence[str], config_file: Optional[str] = None, source: str = "config") -> List[str]:
    """Import every entry of custom_imports (once per process); returns the plug-in options they declared."""
    options: List[str] = []
    for entry in entries:
        key = _import(entry, config_file, source)
        options.extend(n for n in _DECLARED.get(key, []) if n not in options)
    return options


def _import(entry: str, config_file: Optional[str], source: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise UserError(f"{source}: option 'custom_imports' lists {short_repr(entry)}; expected a .py file or a "
                        f"module name")
    if entry.endswith(".py") or os.sep in entry or "/" in entry:
        path = _find_file(entry, config_file, source)
        name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(name)
        if loaded is not None:
            if os.path.realpath(getattr(loaded, "__file__", "") or "") != path:
                raise UserError(f"{source}: custom_imports {entry}: a module named {name!r} is already imported "
                                f"from {getattr(loaded, '__file__', 'elsewhere')}; rename the file")
            return path
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        _run(lambda: spec.loader.exec_module(module), entry, path, source, undo=lambda: sys.modules.pop(name, None))
        return path
    if entry in sys.modules:
        return entry
    _run(lambda: importlib.import_module(entry), entry, entry, source)
    return entry


def _find_file(entry: str, config_file: Optional[str], source: str) -> str:
    tried = [os.path.abspath(entry)]
    if config_file and not os.path.isabs(entry):
        tried.append(os.path.abspath(os.path.join(os.path.dirname(config_file), entry)))
    for path in tried:
        if os.path.isfile(path):
            return os.path.realpath(path)
    raise UserError(f"{source}: custom_imports {entry}: no such file (looked for {' and '.join(tried)})")


def _run(load, entry: str, where: str, source: str, undo=lambda: None) -> None:
    key = os.path.realpath(where) if os.path.isfile(where) else where
    _importing.append(key)
    _DECLARED.setdefault(key, [])
    try:
        load()
    except UserError:
        undo()
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed, in one line
        undo()
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.realpath(f.filename) == key]
        line = f", line {frames[-1].lineno}" if frames else ""
        message = (str(e).splitlines() or [""])[0][:300]
        raise UserError(f"{source}: custom_imports {entry}: importing it failed{line}: {type(e).__name__}: "
                        f"{message} (--debug shows the traceback)") from e
    finally:
        _importing.pop()
