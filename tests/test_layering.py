"""The packages' layers: each imports only the layers below it, and no file of the core packages outgrows 400 lines.

utils at the bottom; datasets and model on utils; solver on model; evaluation on datasets and model (never on the
trainer); processor on any of them; the entry points (train.py, test.py, retrieve.py, tools/, benchmarks/) on top.
Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("utils", "datasets", "model", "solver", "processor", "evaluation")
ENTRY_POINTS = ("train", "test", "retrieve", "tools", "benchmarks", "tests")
# The project's modules each package may import, beyond its own.
ALLOWED = {
    "utils": set(),
    "datasets": {"utils"},
    "model": {"utils"},
    "solver": {"utils", "model"},
    "evaluation": {"utils", "datasets", "model"},
    "processor": set(PROJECT),
}
MAX_LINES = 400


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
