"""requirements.txt names exactly the third-party distributions that the project's .py files import.

The imports are read with `ast` from every .py file (entry points, packages, tools, benchmarks, tests), lazy
imports inside functions included, so a new import without its requirement, or a requirement nothing imports any
more, fails here instead of on a fresh install.
"""
import os
import sys
from typing import Dict

from helpers import DISTRIBUTIONS, NEEDS_MORE, ROOT, absolute_imports, normalise, project_files, requirement_specs


def required_distributions() -> Dict[str, str]:
    """{normalised distribution name: a file that needs it} over the project's third-party imports."""
    files = list(project_files())
    # Scripts run from their own folder (tests, tools, benchmarks) import their neighbours by bare name.
    own = {os.path.splitext(os.path.basename(path))[0] for path in files}
    own |= {os.path.relpath(path, ROOT).split(os.sep)[0] for path in files if os.path.dirname(path) != ROOT}
    needed = {}
    for path in sorted(files):
        for module in {module for module, _ in absolute_imports(path)}:
            top = module.split(".")[0]
            dists = [] if top in sys.stdlib_module_names or top in own else [DISTRIBUTIONS.get(top, top)]
            dists += [dist for prefix, dist in NEEDS_MORE.items() if module == prefix or
                      module.startswith(prefix + ".")]
            for dist in dists:
                needed.setdefault(normalise(dist), os.path.relpath(path, ROOT))
    return needed


def test_requirements_are_exactly_the_imported_distributions():
    needed = required_distributions()
    listed = set(requirement_specs())
    problems = [f"add {dist} (imported by {needed[dist]})" for dist in sorted(set(needed) - listed)]
    problems += [f"remove {dist} (no .py file imports it; if one does under another name, add that name to "
                 f"DISTRIBUTIONS in {os.path.relpath(__file__, ROOT)})" for dist in sorted(listed - set(needed))]
    assert not problems, "requirements.txt is out of date: " + "; ".join(problems)


def test_the_scan_sees_lazy_imports_and_leaves_out_our_own_modules():
    needed = required_distributions()
    assert needed["safetensors"] == os.path.join("model", "backbone.py")  # imported inside a function
    assert needed["tensorboard"] == os.path.join("utils", "event_log.py")  # through torch.utils.tensorboard
    assert {"pillow", "pyyaml", "open-clip-torch", "torch", "pytest"} <= set(needed)
    # packages, entry points, and the helpers that tests and benchmarks import by bare name
    for own in ("model", "utils", "train", "test", "reliability_helpers", "train_step", "evaluate_runs"):
        assert normalise(own) not in needed, own
