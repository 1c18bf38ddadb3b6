"""The packages' layers: each imports only the layers below it; no file of the core packages outgrows 400 lines and
no function in them 60; nothing changes sys.path; no shared layer names a method.

utils at the bottom; datasets and model on utils; solver on model; evaluation on datasets and model (never on the
trainer); processor on any of them; methods/ (one package per method) on all of them and on each other, never
imported by them (utils/plugins.py imports methods/ by folder, as a plug-in). On top, the entry points (train.py,
test.py, retrieve.py) and tools/ import the library and never each other (a tool's own modules aside);
benchmarks/ import the library only. Read from the source with `ast`, so an import inside a function counts as
much as one at the top.
"""
import ast
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("utils", "datasets", "model", "solver", "processor", "evaluation")
PROJECT = (*SHARED, "methods")
ENTRY_POINTS = ("train", "test", "retrieve", "tools", "benchmarks", "tests")
# The project's modules each package may import, beyond its own.
ALLOWED = {
    "utils": set(),
    "datasets": {"utils"},
    "model": {"utils"},
    "solver": {"utils", "model"},
    "evaluation": {"utils", "datasets", "model"},
    "processor": set(SHARED),
    "methods": set(SHARED),
}
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
# Drawing a pedestrian is one long, flat sequence of shapes; splitting it would only scatter the coordinates.
LONG_FUNCTIONS_ALLOWED = {("datasets/demo_render.py", "render_pedestrian")}
ENTRY_FILES = ("train", "test", "retrieve")


def python_files(package):
    for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def imported_top_levels(path):
    """(line, top-level name) of every absolute import in the file at `path`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_packages_import_only_the_layers_below():
    wrong = []
    for package, allowed in ALLOWED.items():
        forbidden = (set(PROJECT) | set(ENTRY_POINTS)) - allowed - {package}
        for path in python_files(package):
            for line, name in imported_top_levels(path):
                if name in forbidden:
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_core_files_stay_under_400_lines():
    long = []
    for package in PROJECT:
        for path in python_files(package):
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES:
                long.append(f"{os.path.relpath(path, ROOT)}: {lines} lines")
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


def test_the_checks_see_real_imports():
    """The walk finds the packages' files and their imports, so the checks above cannot pass vacuously."""
    evaluator = os.path.join(ROOT, "evaluation", "evaluator.py")
    assert evaluator in set(python_files("evaluation"))
    assert "evaluation" in {name for _, name in imported_top_levels(evaluator)}
    assert sum(1 for package in PROJECT for _ in python_files(package)) > 40


def top_floor_files():
    """(its own name, path) of every entry point, tool and benchmark."""
    for name in ENTRY_FILES:
        yield name, os.path.join(ROOT, f"{name}.py")
    for folder in ("tools", "benchmarks"):
        for path in python_files(folder):
            yield f"{folder}.{os.path.splitext(os.path.basename(path))[0]}", path


def imported_modules(path):
    """(line, dotted module) of every absolute import, `from tools import x` counted as tools.x."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ("tools", "benchmarks"):
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"
            else:
                yield node.lineno, node.module


def test_entry_points_and_tools_import_the_library_not_each_other():
    wrong = []
    for own, path in top_floor_files():
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            other_entry = top in ENTRY_FILES and module != own
            tool_or_bench = top in ("tools", "benchmarks") and module != own and module != "tools"
            if other_entry or tool_or_bench or top == "tests":
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    assert not wrong, "entry points, tools and benchmarks must import only the library:\n" + "\n".join(wrong)


def test_core_functions_stay_under_60_lines():
    long = []
    for package in PROJECT:
        for path in python_files(package):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            rel = os.path.relpath(path, ROOT)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                        long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_nothing_changes_the_import_path():
    """The project runs with its root on the import path (run.sh, pytest.ini, python -m); no file edits sys.path."""
    found = []
    for package in (*PROJECT, "tools", "benchmarks", "tests"):
        for path in python_files(package):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "path" and \
                        isinstance(node.value, ast.Name) and node.value.id == "sys":
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    for name in ENTRY_FILES:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            if "sys.path" in f.read():
                found.append(f"{name}.py")
    assert not found, "sys.path used in:\n" + "\n".join(found)


def test_the_top_floor_checks_see_real_imports():
    files = dict(top_floor_files())
    assert {"train", "test", "retrieve", "tools.serve", "tools.evaluate_runs", "benchmarks.train_step"} <= set(files)
    assert ("processor.training" in {m for _, m in imported_modules(files["train"])})


# The words of the built-in methods' names and of their parts: no identifier of a shared layer holds one.
METHOD_WORDS = {"irra", "php", "rde", "tbps", "mlm", "tse", "tal", "ccd", "efp", "crfm", "moe", "nitc", "ritc",
                "citc", "bge", "simclr", "cmt"}


def identifier_words(name):
    """The words of an identifier: split at underscores and at lower-to-upper case changes, lower-cased."""
    return {w.lower() for w in re.split(r"_+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", name) if w}


def method_identifiers(path):
    """(line, identifier) of every name token in the file whose words include a method's."""
    with open(path, encoding="utf-8") as f:
        tokens = tokenize.generate_tokens(io.StringIO(f.read()).readline)
        return [(t.start[0], t.string) for t in tokens
                if t.type == tokenize.NAME and identifier_words(t.string) & METHOD_WORDS]


def test_no_shared_layer_names_a_method():
    found = [f"{os.path.relpath(path, ROOT)}:{line} {name}" for package in SHARED for path in python_files(package)
             for line, name in method_identifiers(path)]
    found += [os.path.relpath(path, ROOT) for package in SHARED for path in python_files(package)
              if identifier_words(os.path.splitext(os.path.basename(path))[0]) & METHOD_WORDS]
    assert not found, f"{len(found)} identifiers of the shared layers name a method:\n" + "\n".join(found[:40])


def test_the_method_name_check_sees_names(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def set_efp_attention(rdeLoss, x):\n    return x  # php in a comment is prose\n")
    assert [name for _, name in method_identifiers(str(path))] == ["set_efp_attention", "rdeLoss"]
    assert identifier_words("TBPSHead") == {"tbps", "head"} and identifier_words("mlm_ids") == {"mlm", "ids"}
