"""`custom_imports`: the user's own Python files (or modules), imported before a run is built.

A plug-in file registers heads, losses and data sets with the decorators of model/registry.py and
datasets/registry.py, and declares its options with them; nothing of the project is edited. Entries are file
paths, looked up relative to the current folder and then to the folder of the config file that names them, or
importable module names (`my_package.losses`). A config records each file entry by its absolute path, so the run
means the same file wherever it is used later. A file is imported once per process, by its path, as a module of
its own (`_plugin_<name>_<hash of the path>`): two files of one name in different folders are two plug-ins. The
options it declared are remembered, so that every config naming it gets them. `plugin_hashes` gives the sha256 of
each plug-in's file, which a run records so that a plug-in changed after training is noticed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError, short_repr
from utils.schema import Option, register_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folder (and package) of the built-in methods, one package each.
METHODS = "methods"
# The plug-in being imported: the registries record it as the owner of what it declares.
_importing: List[str] = []
# entry (absolute file path or module name) -> the plug-in options it declared
_DECLARED: Dict[str, List[str]] = {}
# (kind, name) of every registered component (head, loss, data set, ...) -> the options it declared
COMPONENT_OPTIONS: Dict[Tuple[str, str], List[str]] = {}


def declare(registry: Dict[str, Any], kind: str, name: str, module: str, options: Sequence[Option]) -> str:
    """What every registry does first on a registration of `name` from `module`: returns its owner (the
    custom_imports entry being imported right now, else `module`), after refusing a name that another owner
    registered (a ValueError: a programming error, reported when the plug-in is imported) and adding `options` to
    the schema, remembered for the entry that declared them."""
    owner = _importing[-1] if _importing else module
    previous = registry.get(name)
    if previous is not None and previous.owner != owner:
        raise ValueError(f"{kind} {name!r} of {owner} is already registered by {previous.owner}")
    builtin = not _importing and is_project_module(module)
    names = register_options(options, owner, builtin=builtin)
    COMPONENT_OPTIONS[(kind, name)] = list(names)
    if _importing:
        declared = _DECLARED.setdefault(_importing[-1], [])
        declared.extend(n for n in names if n not in declared)
    return owner


PROJECT_PACKAGES = ("model", "datasets", "processor", "evaluation", "solver", "utils", METHODS)


def is_project_module(module: str) -> bool:
    """Whether `module` is one of the project's own (its registrations are built-in components)."""
    return module.split(".")[0] in PROJECT_PACKAGES


def built_in_methods() -> List[str]:
    """The packages of methods/ (a folder with an __init__.py each), by name."""
    folder = os.path.join(ROOT, METHODS)
    return sorted(name for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name, "__init__.py"))) if os.path.isdir(folder) else []


def load_methods() -> None:
    """Import every built-in method (once per process), in the order of their names: each registers its heads,
    losses, layouts and options as a plug-in does, with no privilege; nothing of the shared layers names them."""
    for name in built_in_methods():
        importlib.import_module(f"{METHODS}.{name}")


def import_plugins(entries: Sequence[str], config_file: Optional[str] = None,
                   source: str = "config") -> Tuple[List[str], List[str]]:
    """Import the built-in methods, then every entry of custom_imports (once per process); returns (the entries
    resolved: files and folders by absolute path, modules by name; the plug-in options they declared)."""
    load_methods()
    resolved: List[str] = []
    options: List[str] = []
    for entry in entries:
        key = _import(entry, config_file, source)
        resolved.append(key)
        options.extend(n for n in _DECLARED.get(key, []) if n not in options)
    return resolved, options


def is_file_entry(entry: str) -> bool:
    """A file or a folder (a package), as opposed to a module name: a folder of the current one with an __init__.py
    (`my_rde`, a copy of a method) is the folder, whatever module of that name the import path holds."""
    return entry.endswith(".py") or os.sep in entry or "/" in entry or os.path.isfile(os.path.join(entry,
                                                                                                  "__init__.py"))


def module_name(path: str) -> str:
    """The module a plug-in file is imported as: its name and a hash of its path (unique per file)."""
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    return f"_plugin_{stem}_{hashlib.sha256(path.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def _import(entry: str, config_file: Optional[str], source: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise UserError(f"{source}: option 'custom_imports' lists {short_repr(entry)}; expected a .py file or a "
                        f"module name")
    if is_file_entry(entry):
        path = _find_file(entry, config_file, source)
        name = module_name(path)
        if name in sys.modules:
            return path
        # A folder is a package (a method's, such as a copy of methods/rde): its modules import each other relatively.
        spec = (importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                       submodule_search_locations=[path])
                if os.path.isdir(path) else importlib.util.spec_from_file_location(name, path))
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
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, "__init__.py")):
            return os.path.realpath(path)
    what = "no such file" if entry.endswith(".py") else "no such file, nor a folder with an __init__.py"
    raise UserError(f"{source}: custom_imports {entry}: {what} (looked for {' and '.join(tried)})")


def _run(load, entry: str, where: str, source: str, undo=lambda: None) -> None:
    key = os.path.realpath(where) if os.path.isfile(where) else where
    _importing.append(key)
    _DECLARED.setdefault(key, [])
    try:
        load()
    except UserError:
        undo()
        raise
    except SystemExit as e:
        # A plug-in that exits at import would otherwise end the command silently, with its code (0 looks fine).
        undo()
        raise UserError(f"{source}: custom_imports {entry}: importing it called exit({short_repr(e.code)}); a "
                        f"plug-in must only define and register things") from None
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed, in one line
        undo()
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.realpath(f.filename) == key or os.path.realpath(f.filename).startswith(key + os.sep)]
        line = f", line {frames[-1].lineno}" if frames else ""
        message = (str(e).splitlines() or [""])[0][:300]
        raise UserError(f"{source}: custom_imports {entry}: importing it failed{line}: {type(e).__name__}: "
                        f"{message} (--debug shows the traceback)") from e
    finally:
        _importing.pop()


def plugin_file(entry: str) -> Optional[str]:
    """The file (or folder) of an imported custom_imports entry (a file or folder entry is its own path; a module:
    its __file__)."""
    if is_file_entry(entry):
        return entry if os.path.isfile(entry) or os.path.isdir(entry) else None
    module = sys.modules.get(entry)
    path = getattr(module, "__file__", None)
    return os.path.realpath(path) if path and os.path.isfile(path) else None


def plugin_hashes(entries: Sequence[str]) -> Dict[str, str]:
    """{plug-in file: its sha256} of custom_imports entries (resolved, as a config holds them)."""
    hashes = {}
    for entry in entries:
        path = plugin_file(entry)
        if path is not None:
            hashes[path] = _sha256(path)
    return hashes


def _sha256(path: str) -> str:
    """sha256 of a file; of a folder, of each .py file's path within it and bytes, in sorted order."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    digest = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(folder, name), path) for folder, _, names in os.walk(path)
                   for name in names if name.endswith(".py"))
    for rel in files:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        with open(os.path.join(path, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def changed_plugins(recorded: Dict[str, str], entries: Sequence[str]) -> List[str]:
    """How the plug-ins of `entries` differ from the hashes a run `recorded` when it trained, one phrase each."""
    current = plugin_hashes(entries)
    changes = []
    for path, sha in sorted(recorded.items()):
        if path not in current:
            changes.append(f"{path} is no longer used or found")
        elif current[path] != sha:
            changes.append(f"{path} changed since training (sha256 {sha[:12]} -> {current[path][:12]})")
    changes += [f"{path} was not used in training" for path in sorted(set(current) - set(recorded))]
    return changes
