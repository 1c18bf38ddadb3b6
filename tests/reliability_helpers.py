"""Shared by tests/test_reliability.py and tests/test_bad_inputs.py: a tiny Demo-PEDES, the smoke config's command
line for it, and running an entry point in-process the way its `__main__` would.

Training on the tiny set (8 / 4 / 2 identities, 2 images each, batch 8: 4 iterations per epoch) costs seconds.
"""
import hashlib
import os

import pytest

from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
TINY = {"num_train_ids": 8, "num_val_ids": 4, "num_test_ids": 2, "images_per_id": 2}
FAST = ["--batch_size", "8"]  # 8 ids x 2 images x 2 captions = 32 pairs: 4 iterations per epoch
ITERS = 4


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A data root holding the tiny Demo-PEDES."""
    from datasets.demo_pedes import generate_demo_pedes
    root = str(tmp_path_factory.mktemp("tiny"))
    generate_demo_pedes(os.path.join(root, "Demo-PEDES"), seed=0, **TINY)
    return root


def train_argv(root, out, *extra):
    """train.py arguments: the smoke config on data root `root`, runs under `out`, batch 8, then `extra`."""
    return ["--config_file", SMOKE, "--root_dir", root, "--output_dir", out, *FAST, *extra]


def run_dir(out):
    """The run folder of the smoke config under output folder `out`."""
    return os.path.join(out, "Demo-PEDES", "smoke")


def run_entry(main, argv, capsys):
    """Run an entry point in-process as its `__main__` would; returns (exit code, stderr)."""
    capsys.readouterr()
    # Not pytest.raises: its ExceptionInfo would keep the failed run's frames (and data-loader workers) alive in a
    # reference cycle, which the garbage collector breaks only later and slowly (see run_main).
    try:
        run_main(main, argv)
    except SystemExit as e:
        code = e.code
    else:
        pytest.fail("run_main returned instead of exiting")
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, *culprits):
    """A non-zero exit, stderr one line `error: ...` naming each of `culprits`, no traceback; returns the line."""
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for name in culprits:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree(folder):
    """{relative path: sha256} of every file under `folder`: what a failed command must leave unchanged."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found
