"""Test helper: `python tests/train_when_told.py ARGS` imports train.py now and runs it with ARGS once the line
"go" arrives on stdin (it exits quietly if stdin closes first).

It runs with the project on PYTHONPATH (tests/conftest.py sets it). It is `python train.py ARGS` with the interpreter and import start-up (several seconds on a busy machine) done in
advance, so a test can start a resumed run the moment the run it resumes has been killed.
"""
import sys

import train
from utils.cli import run_main

if __name__ == "__main__" and sys.stdin.readline().strip() == "go":
    run_main(train.main, sys.argv[1:])
