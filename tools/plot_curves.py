"""Training curves of a run: `python -m tools.plot_curves RUN_DIR [RUN_DIR ...]` writes RUN_DIR/curves.png
(evaluation/curves.py; training draws them when it ends)."""
from __future__ import annotations

from evaluation.curves import plot_curves
from utils.cli import DEBUG, Command, parse_command_line, run_main
from utils.errors import UserError

COMMAND = Command("python -m tools.plot_curves", __doc__, flags=(DEBUG,), positionals="RUN_DIR", overrides=False)


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    if not args.positionals:
        raise UserError("usage: python -m tools.plot_curves RUN_DIR [RUN_DIR ...] (a run folder holding history.json)")
    for run_dir in args.positionals:
        print(plot_curves(run_dir))
    return 0


if __name__ == "__main__":
    run_main(main)
