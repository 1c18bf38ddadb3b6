"""Test helper: `python tests/train_when_told.py ARGS` imports train.py now and runs it with ARGS once the line
"go" arrives on stdin (it exits quietly if stdin closes first).

It is `python train.py ARGS` with the interpreter and import start-up (several seconds on a busy machine) done in
advance, so a test can start a resumed run the moment the run it resumes has been killed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from utils.cli import run_main  # noqa: E402

if __name__ == "__main__" and sys.stdin.readline().strip() == "go":
    run_main(train.main, sys.argv[1:])
