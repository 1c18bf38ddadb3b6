"""Training curves of a run: `python -m tools.plot_curves RUN_DIR [RUN_DIR ...]` writes RUN_DIR/curves.png
(evaluation/curves.py; training draws them when it ends)."""
from __future__ import annotations

from evaluation.curves import plot_curves
from utils.cli import add_shared, command, parse_command_line, run_main
from utils.errors import UserError

COMMAND = command("python -m tools.plot_curves", __doc__, positionals="RUN_DIR", options=False)
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    if not args.positionals:
        raise UserError("usage: python -m tools.plot_curves RUN_DIR [RUN_DIR ...] (a run folder holding history.json)")
    for run_dir in args.positionals:
        print(plot_curves(run_dir))
    return 0


if __name__ == "__main__":
    run_main(main)
