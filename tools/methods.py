"""Train and test every method's preset under one protocol and tabulate them: what `sh run.sh methods` runs.

    python -m tools.methods --seeds 1 2 3                  the Demo presets: irra_demo, demo (PHP), rde_demo, tbps_demo
    python -m tools.methods --paper cuhk --seeds 1 2 3     the paper presets (irra_cuhk, php_cuhk, ...; data needed)
    python -m tools.methods --methods PHP,RDE --noisy_rate 0.5 --tag noise50
    python -m tools.methods --seeds 1 2 3 --jobs 1        one run at a time, in this process, with every thread

`--key value` options apply to every method's runs. Finished runs are only tested again. It writes
logs/methods.md and methods.csv (methods_<dataset>.* with --paper, methods[_<dataset>]_<TAG>.* with --tag). The job is processor.methods.run_methods.
"""
from __future__ import annotations

import os
import shlex

from processor.methods import DATASETS, run_methods
from utils.cli import add_shared, command, integer, parse_command_line, run_main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
COMMAND = command("sh run.sh methods", __doc__)
COMMAND.add_argument("--seeds", nargs="+", type=integer, metavar="N", expects="integers",
                     needs="at least one seed, e.g. --seeds 1 2 3",
                     help="one run per seed and method, named <name>_seed<N>")
COMMAND.add_argument("--paper", choices=DATASETS, help="the paper presets of this data set instead of the Demo ones")
COMMAND.add_argument("--methods", metavar="NAMES", help="a comma-separated subset: IRRA, PHP, RDE, TBPS-CLIP")
COMMAND.add_argument("--tag", default="", metavar="TAG",
                     help="name the runs <name>_<TAG> and the tables methods_<TAG>.md/.csv (a table under other "
                          "options)")
COMMAND.add_argument("--jobs", default="auto", metavar="N",
                     help="runs side by side, each with cores/N threads: auto (on the CPU one per core, at most 4; "
                          "on a GPU 1) or N")
add_shared(COMMAND, "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    # Given, even as "" or ",", it selects: an empty list is refused rather than read as every method.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    return run_methods(CONFIGS, args.seeds, args.overrides, args.paper, methods, seed_given="seed" in args.overrides,
                       command=" ".join(["sh run.sh methods", *map(shlex.quote, argv)]), tag=args.tag,
                       jobs=args.jobs)


if __name__ == "__main__":
    run_main(main)
