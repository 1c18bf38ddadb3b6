"""Check before training that a config's data set and pretrained weights are where it says; list what is missing.

`python -m tools.preflight --config_file configs/php_cuhk.yaml [--key value ...]`: exit 0 when ready, 2 with one
line per missing piece (processor.presets.problems; `sh run.sh <preset>` makes the same check).
"""
from __future__ import annotations

import sys

from processor.presets import problems
from utils.cli import add_shared, command, parse_command_line, run_main
from utils.config import build_config

COMMAND = command("python -m tools.preflight", __doc__)
COMMAND.add_argument("--config_file", required=True, metavar="FILE", help="the preset's YAML")
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    found = problems(build_config(args.config_file, args.overrides))
    for line in found:
        print(f"missing: {line}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    run_main(main)
