"""Train a model: `python train.py --config_file configs/demo.yaml [--key value ...]`.

Also under torchrun: `torchrun --nproc_per_node=N train.py --config_file ...`. The job itself is
processor.training.train.
"""
from __future__ import annotations

import os

from processor.training import train
from utils.cli import add_shared, command, parse_command_line, run_main
from utils.config import build_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
COMMAND = command("train.py", __doc__)
COMMAND.add_argument("--config_file", default=DEFAULT_CONFIG, metavar="FILE", help="YAML config")
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    train(build_config(args.config_file, args.overrides), args.config_file)
    return 0


if __name__ == "__main__":
    run_main(main)
